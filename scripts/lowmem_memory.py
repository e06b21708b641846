#!/usr/bin/env python
"""Peak memory of `sparsellm prune --low-memory` on a random Llama larger than what it should hold.

Writes a random Llama of about --size-gb to disk one shard per decoder layer (so writing it needs one
layer of memory, not the model), then prunes it in a child process and reports that process's peak RSS
(VmHWM, as the child reads it at the end; wait4's ru_maxrss is kept too but also counts the parent's
pages shared between fork and exec). With --in-memory the same recipe also runs the whole-model
path for comparison. Prints one JSON object (also written to --json):

    .venv/bin/python scripts/lowmem_memory.py --size-gb 2.5 [--in-memory] [--json out.json]

The model is wide with few layers (hidden 1536, MLP 6144: ~138 MB per layer in float32) and a
320-token vocabulary trained on tests/data/tiny.txt, so that one layer is a small part of the model
and the run is quick (4 calibration windows of 64 tokens, Wanda 50 %; or --structure, --slice)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "tiny.txt"


def _config(hidden: int, intermediate: int, layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                       max_position_embeddings=256, tie_word_embeddings=False, dtype=dtype)


def write_random_llama(folder: Path, size_bytes: int, hidden: int = 1536, intermediate: int = 6144,
                       dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """A Llama of about size_bytes, written shard by shard in the save_pretrained layout."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):  # shapes and names only
        probe = AutoModelForCausalLM.from_config(_config(hidden, intermediate, 1, dtype), dtype=dtype)
    per_layer = sum(p.numel() for n, p in probe.named_parameters() if n.startswith("model.layers.0."))
    item = torch.empty((), dtype=dtype).element_size()
    layers = max(1, round(size_bytes / (per_layer * item)))
    config = _config(hidden, intermediate, layers, dtype)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, p in meta.state_dict().items():
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = p.shape
    weight_map, total = {}, 0
    for k, (key, shapes) in enumerate(groups.items(), 1):
        tensors = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02).to(dtype)
                   for n, s in shapes.items()}
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        weight_map.update((n, fname) for n in tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    config.save_pretrained(folder)
    _train_tokenizer().save_pretrained(folder)
    return {"layers": layers, "hidden": hidden, "intermediate": intermediate, "dtype": str(dtype).removeprefix("torch."),
            "bytes": total, "layer_bytes": per_layer * item}


def prune_in_child(model: Path, out: Path, recipe: Path, mode: str) -> dict:
    """Run the CLI in a child process; its peak RSS as the kernel counted it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sparsellm", "prune", "--model", str(model), "--recipe", str(recipe),
                             "--output", str(out), "--overwrite", mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{output[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    # the child's own high-water mark (VmHWM, read by the child at the end), not wait4's ru_maxrss: that
    # one also counts the parent's pages the child shared between fork and exec (a test runner's GB)
    return {"peak_rss_bytes": report["memory"]["peak_rss_bytes"], "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "seconds": time.perf_counter() - t,
            "rss_after_load_bytes": report["memory"]["rss_after_load_bytes"],
            "sparsity": report["sparsity"]["overall"], "removed": report["sparsity"]["removed"],
            "stage_peak_rss_bytes": [s["peak_rss_bytes"] for s in report["stages"]],
            "parameters": [report["model"]["parameters_before"], report["model"]["parameters"]],
            "perplexity_after": report["perplexity"]["after"]}


def stages(args) -> list[dict]:
    if args.slice:
        return [{"slice": {"method": "slicegpt", "slicing": 0.25, "rotation": args.slice}}]
    if args.structure:
        return [{"structure": {"method": args.structure, "ffn": 0.5, "heads": 0.5}}]
    allocate = [{"allocate": {"method": args.allocate, **({"nsamples": 1, "num_noise": 1} if args.allocate == "ecoflap"
                                                          else {})}}] if args.allocate else []
    return allocate + [{"prune": {"method": args.method, "sparsity": 0.5}}]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.5, help="model size on disk, GB (1e9 bytes)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=6144)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--structure", help="instead of --method: structured pruning (cfsp, wanda-sp) of half the FFN "
                    "channels and heads")
    ap.add_argument("--slice", choices=["per-layer", "uniform"], help="instead of --method: SliceGPT, 25 %% of the "
                    "hidden dimension, with this rotation")
    ap.add_argument("--allocate", help="an allocation (owl, ecoflap) before --method")
    ap.add_argument("--in-memory", action="store_true", help="also prune it with the whole model loaded")
    ap.add_argument("--workdir", type=Path, help="where the model and outputs go (default: a temp folder, removed)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        model = write_random_llama(tmp / "model", int(args.size_gb * 1e9), args.hidden, args.intermediate,
                                   getattr(torch, args.dtype))
        model["write_seconds"] = time.perf_counter() - t
        recipe = tmp / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({
            "calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 64, "batch_size": 4},
            "evaluation": {"ppl": [str(TEXT)], "limit": 2, "before": False},
            "stages": stages(args)}))
        result = {"model": model, "low_memory": prune_in_child(tmp / "model", tmp / "out", recipe, "--low-memory")}
        if args.in_memory:
            result["in_memory"] = prune_in_child(tmp / "model", tmp / "out", recipe, "--in-memory")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
