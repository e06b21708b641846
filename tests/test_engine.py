"""The sequential layer-wise engine on tiny random models of every supported architecture."""
import copy

import pytest
import torch
from torch import nn

from conftest import ARCHS, tiny_model
from sparsellm.calibrate import make_selector, run_layerwise
from sparsellm.calibrate.engine import target_linears
from sparsellm.compress import build_method
from sparsellm.compress.base import LayerwiseMethod
from sparsellm.errors import UnsupportedArchitectureError
from sparsellm.loading import get_adapter
from sparsellm.recipe import recipe_from_dict


def prune(model, windows, **stage):
    spec = recipe_from_dict({"stages": [{"prune": stage}]}).stages[0].spec
    run_layerwise(model, get_adapter(model), windows, [build_method(spec)],
                  make_selector(spec.targets, spec.ignore), batch_size=3)
    return model


def decoder_linears(model):
    adapter = get_adapter(model)
    out = {}
    for i, layer in enumerate(adapter.layers(model)):
        for n, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                out[f"{adapter.layer_prefix(i)}.{n}"] = m
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_exact_per_row(arch, method, windows):
    extra = {"scope": "row"} if method in ("magnitude", "sparsegpt") else {}
    model = prune(tiny_model(arch), windows, method=method, sparsity=0.5, **extra)
    linears = decoder_linears(model)
    assert len(linears) >= 6 * 2
    for name, lin in linears.items():
        zeros = (lin.weight == 0).sum(1)
        assert (zeros == lin.in_features // 2).all(), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_exact_per_group(arch, method, pattern, windows):
    n, m = map(int, pattern.split(":"))
    model = prune(tiny_model(arch), windows, method=method, pattern=pattern)
    for name, lin in decoder_linears(model).items():
        groups = (lin.weight == 0).view(lin.out_features, -1, m).sum(-1)
        assert (groups == n).all(), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_zero_sparsity_leaves_logits_unchanged(arch, method, windows):
    dense = tiny_model(arch)
    pruned = prune(copy.deepcopy(dense), windows, method=method, sparsity=0.0)
    with torch.no_grad():
        assert torch.equal(dense(windows).logits, pruned(windows).logits)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_embeddings_lm_head_and_ignored_untouched(arch, windows):
    dense = tiny_model(arch)
    pruned = prune(copy.deepcopy(dense), windows, method="wanda", sparsity=0.5, ignore=["*.layers.1.*", "re:\\.(down_proj|fc2)$"])
    for (name, p0), (_, p1) in zip(dense.named_parameters(), pruned.named_parameters()):
        touched = not torch.equal(p0, p1)
        expected = ".layers.0." in name and name.endswith("weight") and "norm" not in name \
            and not name.endswith(("down_proj.weight", "fc2.weight"))
        assert touched == expected, name


def test_wanda_statistics_come_from_already_pruned_layers(windows):
    """Layer 1's calibration inputs must be those of the model whose layer 0 is already pruned."""
    seen = {}

    class Recorder(LayerwiseMethod):
        needs = frozenset({"sq_norm"})

        def compress(self, t):
            seen[t.name] = t.stats.sq_norm.clone()

    model = tiny_model("llama")
    spec = recipe_from_dict({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}]}).stages[0].spec
    run_layerwise(model, get_adapter(model), windows, [build_method(spec), Recorder()], make_selector([], []), batch_size=3)

    captured = []
    q1 = model.model.layers[1].self_attn.q_proj
    h = q1.register_forward_hook(lambda m, i, o: captured.append(i[0].reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad():
        model(windows)
    h.remove()
    x = torch.cat(captured)
    expected = (x * x).mean(0)
    assert torch.allclose(seen["model.layers.1.self_attn.q_proj"], expected, rtol=1e-5, atol=1e-7)


def test_true_sequential_differs_and_is_exact(windows):
    a = prune(tiny_model("llama"), windows, method="sparsegpt", sparsity=0.5)
    b = prune(tiny_model("llama"), windows, method="sparsegpt", sparsity=0.5, true_sequential=True)
    wa, wb = a.model.layers[1].mlp.down_proj.weight, b.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(wa, wb)
    assert (wb == 0).sum() == wb.numel() // 2


def _layer_calls(model):
    calls = []
    layers = get_adapter(model).layers(model)
    hs = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    return calls, hs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,stage", [("wanda", {"sparsity": 0.5}), ("wanda", {"pattern": "2:4"}),
                                          ("sparsegpt", {"sparsity": 0.5})])
def test_true_sequential_one_pass_equals_grouped_passes(arch, method, stage, windows, monkeypatch):
    """A true-sequential pass that fits runs each decoder layer once, on every window in one batch, and gives
    the masks of the pass that re-collects the inputs group by group (q/k/v, o, gate/up, down) in batches."""
    from sparsellm.calibrate import engine

    one = tiny_model(arch)
    calls, hs = _layer_calls(one)
    prune(one, windows, method=method, true_sequential=True, **stage)
    for h in hs:
        h.remove()
    assert calls == list(range(len(get_adapter(one).layers(one))))  # one forward per layer: statistics and propagation
    monkeypatch.setattr(engine, "ONE_PASS_BYTES", 0)
    grouped = tiny_model(arch)
    calls, hs = _layer_calls(grouped)
    prune(grouped, windows, method=method, true_sequential=True, **stage)
    for h in hs:
        h.remove()
    assert len(calls) > 2 * len(get_adapter(grouped).layers(grouped))
    plain = prune(tiny_model(arch), windows, method=method, **stage)
    a, b, c = decoder_linears(one), decoder_linears(grouped), decoder_linears(plain)
    for name in a:
        assert torch.equal(a[name].weight == 0, b[name].weight == 0), name
        assert torch.allclose(a[name].weight, b[name].weight, atol=1e-5), name
    # o_proj and the MLP see the already pruned q/k/v: not Wanda's dense-layer statistics
    assert any(not torch.equal(a[n].weight, c[n].weight) for n in a if "down_proj" in n or "fc2" in n)


def test_one_pass_bound_is_fixed_by_shapes(windows):
    from sparsellm.calibrate.engine import ONE_PASS_BYTES, one_pass_fits

    model = tiny_model("llama")
    adapter = get_adapter(model)
    assert one_pass_fits(model, adapter, windows)
    cfg = model.config
    many = torch.zeros(ONE_PASS_BYTES // (4 * cfg.hidden_size * 4) + 1, 1, dtype=torch.long)
    assert not one_pass_fits(model, adapter, many)  # 4 hidden-size temporaries alone pass the bound


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supported architecture: llama, mistral, qwen2, opt"):
        get_adapter(model)


def test_selector_globs_and_regex():
    sel = make_selector(["*.self_attn.*"], ["re:layers\\.0\\."])
    assert sel("model.layers.1.self_attn.q_proj")
    assert not sel("model.layers.0.self_attn.q_proj")
    assert not sel("model.layers.1.mlp.up_proj")
    assert target_linears(tiny_model("llama").model.layers[1], "model.layers.1", sel).keys() == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bfloat16_model_keeps_dtype_and_exact_pattern(method, windows):
    model = tiny_model("qwen2").to(torch.bfloat16)
    prune(model, windows, method=method, pattern="2:4")
    for name, lin in decoder_linears(model).items():
        assert lin.weight.dtype == torch.bfloat16
        assert ((lin.weight == 0).view(lin.out_features, -1, 4).sum(-1) == 2).all(), name


def test_two_stages_on_disjoint_targets(windows):
    model = tiny_model("llama")
    prune(model, windows, method="wanda", pattern="2:4", targets=["*.self_attn.*"])
    prune(model, windows, method="sparsegpt", sparsity=0.25, scope="row", targets=["*.mlp.*"])
    for name, lin in decoder_linears(model).items():
        zeros = (lin.weight == 0).sum(1)
        expected = lin.in_features // 2 if "self_attn" in name else int(lin.in_features * 0.25)
        assert (zeros == expected).all(), name
