"""SliceGPT: the math on hand cases, rotation invariance at 0 % on every architecture, shapes and
parameter counts after slicing, export round trips of both rotation schemes, composition."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import ARCHS, TEXT, tiny_model
from sparsellm.cli import cli
from sparsellm.compress.slicegpt import (center_output, covariance, fit_tied_scale, fold_norm, fuse_norms, pca_basis,
                                         slicegpt, sliced_dim, tied)
from sparsellm.loading import get_adapter, load_model
from sparsellm.pipeline import RunOptions, compress
from sparsellm.errors import RecipeError
from sparsellm.recipe import SliceGPTSlice, recipe_from_dict

IDS = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(1))


def _spec(**kw):
    return SliceGPTSlice(method="slicegpt", **{"slicing": 0.25, **kw})


def model_with_random_norms(arch: str, tie: bool | None = None, seed: int = 0):
    """Norm scales/biases and Linear biases away from their defaults, so fusion has work to do."""
    m = tiny_model(arch, seed)
    if tie is not None and tie != tied(m):
        if tie:
            m.config.tie_word_embeddings = True
            m.lm_head.weight = m.get_input_embeddings().weight
        else:
            m.config.tie_word_embeddings = False
            m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.clone(), requires_grad=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return m


# ---- pure functions ---------------------------------------------------------------------------

def test_sliced_dim_rounds_down_to_multiple():
    assert sliced_dim(576, 0.2, 8) == 456  # int(460.8) = 460 -> 456
    assert sliced_dim(576, 0.0, 8) == 576
    assert sliced_dim(10, 0.2, 1) == 8  # 0.8 * 10 is 7.999... in floating point
    assert sliced_dim(4096, 0.25, 128) == 3072
    with pytest.raises(ValueError, match="leaves no dimension"):
        sliced_dim(64, 0.95, 8)


def test_pca_basis_orders_directions_by_variance():
    cov = torch.diag(torch.tensor([1.0, 9.0, 4.0], dtype=torch.float64))
    vals, vecs = pca_basis(cov, damp=0.0)
    assert vals.tolist() == [9.0, 4.0, 1.0]
    assert torch.equal(vecs.abs(), torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float64))
    # damping shifts eigenvalues by damp * mean(diag) and keeps the vectors
    vals2, vecs2 = pca_basis(cov, damp=0.3)
    assert torch.allclose(vals2, vals + 0.3 * 14 / 3) and torch.allclose(vecs2.abs(), vecs.abs())


def test_covariance_sums_over_tokens_in_float64():
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    assert covariance([x, x]).tolist() == [[20.0, 4.0], [4.0, 8.0]]
    assert covariance([x]).dtype == torch.float64


def test_fold_norm_hand_case():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    new_w, new_b = fold_norm(w, torch.tensor([0.5, -1.0]), torch.tensor([2.0, 10.0]), torch.tensor([1.0, 1.0]))
    assert new_w.tolist() == [[2.0, 20.0], [6.0, 40.0]]
    assert new_b.tolist() == [3.5, 6.0]  # b + W @ shift
    x = torch.randn(5, 2, dtype=torch.float64)
    s, t, b = torch.tensor([2.0, 10.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, -1.0])
    assert torch.allclose((s * x + t) @ w.double().T + b, x @ new_w.T + new_b)


def test_center_output_makes_outputs_mean_free():
    w, b = torch.randn(6, 4), torch.randn(6)
    cw, cb = center_output(w, b)
    y = torch.randn(10, 4, dtype=torch.float64) @ cw.T + cb
    assert torch.allclose(y.mean(-1), torch.zeros(10, dtype=torch.float64), atol=1e-12)


def test_fit_tied_scale_exact_cases():
    torch.manual_seed(0)
    e = torch.randn(50, 6, dtype=torch.float64)
    u = torch.randn(200, 6, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    # a constant scale commutes with any rotation: recovered exactly
    w = torch.full((6,), 1.7, dtype=torch.float64)
    assert torch.allclose(fit_tied_scale(e.T @ e, u.T @ u, q, w), w)
    # identity basis: the scale is already diagonal in it
    w = torch.rand(6, dtype=torch.float64) + 0.5
    assert torch.allclose(fit_tied_scale(e.T @ e, u.T @ u, torch.eye(6, dtype=torch.float64), w), w)
    # a general case is least squares: no other diagonal does better on the logits
    best = fit_tied_scale(e.T @ e, u.T @ u, q, w)

    def err(s):
        return ((u * w) @ e.T - (u @ q * s) @ q.T @ e.T).pow(2).sum()

    for _ in range(5):
        assert err(best) <= err(best + 0.01 * torch.randn(6, dtype=torch.float64))


# ---- invariance ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_norm_fusion_alone_is_exact(arch):
    m = model_with_random_norms(arch)
    ref = m(IDS).logits
    fuse_norms(m, get_adapter(m))
    assert (m(IDS).logits - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("rotation", ["per-layer", "uniform"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_slicing_reproduces_logits(arch, rotation, tie):
    m = model_with_random_norms(arch, tie=tie)
    ref = m(IDS).logits
    slicegpt(m, get_adapter(m), IDS, _spec(slicing=0.0, rotation=rotation, round_to=1), "cpu", 2)
    assert (m(IDS).logits - ref).abs().max() <= 1e-4


def test_tied_uniform_keeps_tie_and_fits_final_scale():
    m = model_with_random_norms("llama", tie=True)
    with torch.no_grad():
        m.model.norm.weight.fill_(1.3)  # a constant scale commutes with the rotation: exact even tied
    ref = m(IDS).logits
    slicegpt(m, get_adapter(m), IDS, _spec(slicing=0.0, rotation="uniform", round_to=1, keep_tied=True), "cpu", 2)
    assert tied(m) and m.config.tie_word_embeddings
    assert (m(IDS).logits - ref).abs().max() <= 1e-4


def test_rmsnorm_models_are_not_centered():
    m = model_with_random_norms("llama")
    before = m.model.embed_tokens.weight.clone()
    fuse_norms(m, get_adapter(m))
    assert torch.equal(m.model.embed_tokens.weight, before)
    m = model_with_random_norms("opt")
    fuse_norms(m, get_adapter(m))
    assert m.model.decoder.embed_tokens.weight.double().mean(-1).abs().max() < 1e-6


# ---- shapes and parameter counts -------------------------------------------------------------

def _expected_params(m, width: int, per_layer: bool, head_width: int, tied_head: bool) -> int:
    cfg = m.config
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    emb = sum(p.numel() for n, p in m.named_parameters() if "embed" in n) // d * width
    total = emb
    names = get_adapter(m).slicing_names()
    for layer in get_adapter(m).layers(m):
        for name, lin in layer.named_modules():
            if isinstance(lin, torch.nn.Linear):
                reads = name in names["attn_in"] + names["mlp_in"]  # these read the residual stream
                writes = name in (names["attn_out"], names["mlp_out"])  # these write to it
                total += (width if reads else lin.in_features) * (width if writes else lin.out_features)
                total += 0 if lin.bias is None else (width if writes else lin.out_features)
    if per_layer:
        total += 2 * n_layers * width * width
    v = cfg.vocab_size
    head_bias = v if cfg.model_type == "opt" else 0
    if per_layer and head_width != width:  # last layer writes the full width
        last = get_adapter(m).layers(m)[-1]
        down = [lin for lin in last.modules() if isinstance(lin, torch.nn.Linear)][-1]
        total += (head_width - width) * (down.in_features + (down.bias is not None) + width)
    if not per_layer and cfg.model_type != "opt":  # stock architecture again: its norms have (constant) weights
        total += (2 * n_layers + 1) * width
    return total + (0 if tied_head else v * head_width + head_bias)


@pytest.mark.parametrize("rotation", ["per-layer", "uniform"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_parameter_counts(arch, rotation):
    m = model_with_random_norms(arch, tie=False)
    expected = _expected_params(m, 48, rotation == "per-layer", 64 if rotation == "per-layer" else 48, False)
    details = slicegpt(m, get_adapter(m), IDS, _spec(rotation=rotation), "cpu", 2)
    assert details["hidden_size"] == [64, 48]
    assert sum(p.numel() for p in m.parameters()) == expected == details["parameters"][1]
    layer = get_adapter(m).layers(m)[0]
    q = layer.self_attn.q_proj
    assert q.in_features == 48 and q.weight.shape == (q.out_features, 48)
    if rotation == "per-layer":
        assert layer.attn_shortcut_Q.shape == (48, 48) and layer.mlp_shortcut_Q.shape == (48, 48)
        last = get_adapter(m).layers(m)[-1]
        assert last.mlp_shortcut_Q.shape == (48, 64) and m.lm_head.in_features == 64  # head kept full (reference)
    else:
        assert m.lm_head.in_features == 48
    assert torch.isfinite(m(IDS).logits).all()


def test_slice_head_option_and_rounding():
    m = model_with_random_norms("llama")
    details = slicegpt(m, get_adapter(m), IDS, _spec(slicing=0.2, slice_head=True, round_to=16), "cpu", 2)
    assert details["hidden_size"] == [64, 48] and m.lm_head.in_features == 48  # int(51.2) = 51 -> 48


def test_uniform_rmsnorm_result_is_the_stock_architecture():
    m = model_with_random_norms("qwen2", tie=True)
    details = slicegpt(m, get_adapter(m), IDS, _spec(rotation="uniform", keep_tied=True), "cpu", 2)
    assert details["stock_architecture"] and details["tied_embeddings"]
    assert type(m).__name__ == "Qwen2ForCausalLM" and m.config.hidden_size == 48
    assert m.config.head_dim == 16 and not hasattr(m.config, "sparsellm_slicing")
    assert type(m.model.norm).__name__ == "Qwen2RMSNorm"
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_more_slicing_costs_more():
    """On a model with a low-rank residual stream, slicing away the empty directions is nearly free."""
    errs = []
    for s in (0.0, 0.25, 0.5, 0.75):
        m = model_with_random_norms("llama")
        ref = m(IDS).logits
        slicegpt(m, get_adapter(m), IDS, _spec(slicing=s, rotation="uniform"), "cpu", 2)
        errs.append((m(IDS).logits - ref).pow(2).mean().item())
    assert errs[0] < 1e-8 and errs == sorted(errs)


# ---- export, reload, composition -------------------------------------------------------------

def _recipe(rotation: str, extra: list | None = None, slicing: float = 0.25):
    return recipe_from_dict({"calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32},
                             "stages": [{"slice": {"method": "slicegpt", "slicing": slicing, "rotation": rotation}}]
                             + (extra or [])})


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch,rotation", [("llama", "per-layer"), ("llama", "uniform"), ("qwen2", "uniform"),
                                           ("mistral", "per-layer"), ("opt", "per-layer"), ("opt", "uniform")])
def test_export_round_trip(arch, rotation, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report = compress(_recipe(rotation), out, RunOptions(), str(model_dirs[arch]))
    ours = load_model(str(out)).model
    stock = rotation == "uniform" and arch != "opt"
    cfg = json.loads((out / "config.json").read_text())
    assert report["model"]["sliced"] == (not stock) and report["model"]["hidden_size"] == (48 if stock else 64)
    assert (out / "modeling_sliced.py").exists() != stock
    if stock:
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert cfg["model_type"] == arch and cfg["hidden_size"] == 48 and "auto_map" not in cfg
    else:
        assert cfg["model_type"] == f"sparsellm_sliced_{arch}" and "AutoModelForCausalLM" in cfg["auto_map"]
        with pytest.raises(ValueError, match="trust_remote_code|custom code"):
            AutoModelForCausalLM.from_pretrained(out)
        plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert type(plain).__module__ != type(ours).__module__  # really the folder's copy of the runtime
    assert torch.equal(_logits(plain.eval()), _logits(ours))
    # reloading reproduces the in-memory model: slice again in memory and compare
    m = load_model(str(model_dirs[arch])).model
    from sparsellm.data import calibration_windows
    tok = load_model(str(model_dirs[arch])).tokenizer
    slicegpt(m, get_adapter(m), calibration_windows(tok, str(TEXT), 4, 32, 0), _recipe(rotation).stages[0].spec, "cpu", 8)
    assert torch.equal(_logits(m), _logits(ours))


def test_sliced_model_generates_with_kv_cache(model_dirs, tmp_path):
    out = tmp_path / "out"
    compress(_recipe("per-layer"), out, RunOptions(), str(model_dirs["llama"]))
    m = load_model(str(out)).model
    prompt = IDS[:1, :8]
    gen = m.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    # the cached decode equals recomputing from scratch each step
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, _logits_of(m, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)


def _logits_of(m, ids):
    with torch.no_grad():
        return m(ids, use_cache=False).logits


def test_slice_then_wanda_2of4(model_dirs, tmp_path):
    out = tmp_path / "out"
    report = compress(_recipe("per-layer", [{"prune": {"method": "wanda", "pattern": "2:4"}}]), out, RunOptions(),
                      str(model_dirs["llama"]))
    assert abs(report["sparsity"]["overall"] - 0.5) < 1e-9
    m = load_model(str(out)).model
    w = m.model.layers[0].self_attn.q_proj.weight
    assert w.shape[1] == 48 and torch.equal((w.reshape(w.shape[0], -1, 4) == 0).sum(-1), torch.full((w.shape[0], 12), 2))
    assert m.model.layers[0].attn_shortcut_Q.count_nonzero() > 48 * 40  # shortcuts are not pruned


def test_cli_slice_recipe_and_bit_identical_reruns(model_dirs, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"calibration: {{dataset: {TEXT}, nsamples: 4, seqlen: 32}}\n"
                      "stages:\n  - slice: {method: slicegpt, slicing: 0.3, rotation: per-layer}\n")
    outs = []
    for n in range(2):
        out = tmp_path / f"o{n}"
        r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["opt"]), "--recipe", str(recipe), "-o", str(out)])
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    assert (outs[0] / "config.json").read_bytes() == (outs[1] / "config.json").read_bytes()
    report = json.loads((outs[0] / "report.json").read_text())
    assert report["stages"][0]["details"]["hidden_size"] == [64, 40]  # int(44.8) = 44 -> 40


@pytest.mark.parametrize("stage,needle", [
    ({"method": "slicegpt", "slicing": 1.0}, "slicing: Input should be less than 1"),
    ({"method": "slicegpt", "slicing": -0.1}, "slicing: Input should be greater than or equal to 0"),
    ({"method": "slicegpt"}, "slicing: Field required"),
    ({"method": "slicegpt", "slicing": 0.2, "rotation": "global"}, "rotation: Input should be 'per-layer' or 'uniform'"),
    ({"method": "slicegpt", "slicing": 0.2, "round_to": 0}, "round_to: Input should be greater than 0"),
])
def test_invalid_slice_stage_exits_2(stage, needle, model_dirs, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"calibration": {"dataset": str(TEXT)}, "stages": [{"slice": stage}]}))
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), "--recipe", str(recipe), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_round_to_must_suit_a_later_nm_stage():
    with pytest.raises(RecipeError, match="round_to 6 must be a multiple of M=4"):
        recipe_from_dict({"stages": [{"slice": {"method": "slicegpt", "slicing": 0.2, "round_to": 6}},
                                     {"prune": {"method": "wanda", "pattern": "2:4"}}]})


def test_post_norm_opt_is_refused_with_a_clear_error(model_dirs, tmp_path):
    folder = tmp_path / "postnorm"
    m = tiny_model("opt")
    m.config.do_layer_norm_before = False
    m.save_pretrained(folder)
    load_model(str(model_dirs["opt"])).tokenizer.save_pretrained(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16},
                                  "stages": [{"slice": {"method": "slicegpt", "slicing": 0.2}}]}))
    r = CliRunner().invoke(cli, ["prune", "--model", str(folder), "--recipe", str(recipe), "-o", str(tmp_path / "o")])
    assert r.exit_code == 4 and "SliceGPT needs pre-norm blocks" in r.output and not (tmp_path / "o").exists()


def test_cli_one_liner_slice_then_prune(model_dirs, tmp_path):
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["mistral"]), "--slicing", "0.25", "--rotation", "uniform",
                                 "--method", "wanda", "--pattern", "2:4", "--calib", str(TEXT), "--nsamples", "4",
                                 "--seqlen", "32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "parameters" in r.output and "sparsity 0.5000" in r.output
    report = json.loads((out / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["slice", "prune"]
    assert "hidden size 64 → 48" in (out / "report.md").read_text()
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), "--rotation", "uniform", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--rotation needs --slicing" in r.output


def test_non_finite_activations_while_slicing_exit_8(tmp_path, tokenizer):
    folder = tmp_path / "broken"
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    m.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16},
                                  "stages": [{"slice": {"method": "slicegpt", "slicing": 0.25}}]}))
    r = CliRunner().invoke(cli, ["prune", "--model", str(folder), "--recipe", str(recipe), "-o", str(tmp_path / "o")])
    assert r.exit_code == 8 and "inside decoder layer 0 while slicing" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
