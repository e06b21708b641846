"""Tiny random models (Llama, Qwen2, Mistral, OPT) and a tokenizer trained on the fly, all offline."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
TEXT = HERE / "data" / "tiny.txt"
SHARED = HERE.parent / "data"  # the demo text, when bash scripts/get_demo_data.sh has run
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


@pytest.fixture
def windows(tokenizer):
    from sparsellm.data import calibration_windows

    return calibration_windows(tokenizer, str(TEXT), nsamples=8, seqlen=32, seed=0)


def cli_process(*args, env: dict | None = None, timeout: int = 300):
    """`python -m sparsellm ARGS` in a real child process (for signals), this checkout first on the path;
    `env` adds variables (e.g. the SPARSELLM_TEST_KILL_AT fault hook)."""
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if not k.startswith("SPARSELLM_TEST_")}
    full["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "sparsellm", *map(str, args)], env=full, capture_output=True,
                          text=True, timeout=timeout)
