"""Same model, recipe, data and seed: the same safetensors bytes, run after run and with 1 or 2 torch
threads, except SparseGPT across thread counts: MKL's float64 Cholesky (its inverse Hessian) rounds
differently with the thread count (README, Determinism). The model is wide enough (512) for MKL to
split its work across threads; the conftest models (64) would not show a thread-count effect."""
import hashlib

import pytest
import torch

from conftest import TEXT, tiny_model
from sparsellm.pipeline import RunOptions, compress
from sparsellm.recipe import recipe_from_dict

SETTINGS = {
    "magnitude-50": [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
    "wanda-2:4+dsnot": [{"prune": {"method": "wanda", "pattern": "2:4"}}, {"refine": {"method": "dsnot"}}],
    "owl+wanda-70": [{"allocate": {"method": "owl"}}, {"prune": {"method": "wanda", "sparsity": 0.7}}],
    "sparsegpt-50": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}],
}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("wide")
    tiny_model("llama", std=0.05, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
               num_key_value_heads=4).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def prune(model, stages, out, threads: int):
    recipe = recipe_from_dict({"seed": 0, "calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32},
                               "stages": stages})
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compress(recipe, out, RunOptions(overwrite=True), str(model))
    finally:
        torch.set_num_threads(before)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_bytes_across_runs_and_thread_counts(name, wide_model, model_dirs, tmp_path):
    if name.startswith("sparsegpt"):
        # MKL's float64 Cholesky rounds differently with 1 and 2 threads: not asserted, measured in README;
        # run after run with the same threads it is the same (a small model suffices for that)
        first = prune(model_dirs["llama"], SETTINGS[name], tmp_path / "a", threads=2)
        assert prune(model_dirs["llama"], SETTINGS[name], tmp_path / "b", threads=2) == first
    else:
        first = prune(wide_model, SETTINGS[name], tmp_path / "a", threads=2)
        assert prune(wide_model, SETTINGS[name], tmp_path / "b", threads=1) == first
