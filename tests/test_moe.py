"""Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) through the engine and the pipeline, on tiny random models
built from their configs: each expert is pruned from the statistics of exactly the tokens the router sends to it
(checked by hand where the routing is forced), every expert matrix gets its exact sparsity or N:M, the router and
the shared-expert gate stay dense, 0 % changes nothing (routing included), exports reload with stock transformers
to identical logits, the report lists the tokens each expert saw, starved experts fall back to magnitude with a
warning, and what does not apply is refused with one line and exit code 4."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from click.testing import CliRunner

from conftest import TEXT
from test_families import (assert_engine_layer_inputs_are_a_plain_forwards,
                           assert_reconstruction_keeps_masks_in_every_memory_mode, random_model)
from test_lowmem import tensors
from sparsellm.allocate import allocate
from sparsellm.calibrate import make_selector, run_layerwise
from sparsellm.loading.experts import expert_matrices
from sparsellm.cli import cli
from sparsellm.compress import build_method
from sparsellm.compress.base import LayerwiseMethod
from sparsellm.loading import get_adapter, load_model
from sparsellm.loading.adapters import MOE_MODEL_TYPES, method_support
from sparsellm.pipeline import RunOptions, compress
from sparsellm.recipe import recipe_from_dict

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")
E, K, H = 4, 2, 32
IDS = torch.randint(2, 320, (2, 24), generator=torch.Generator().manual_seed(1))


def moe_config(family: str, layers: int = 2, **overrides):
    """A tiny config: hidden 32, 4 query heads in 2 KV groups of head_dim 8, 4 experts of width 16, top-2.
    Qwen3-MoE's layer 1 is a dense MLP (mlp_only_layers); Qwen2-MoE has a shared expert of width 24."""
    from transformers import CONFIG_MAPPING

    common = dict(vocab_size=320, hidden_size=H, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=None,
                  num_experts_per_tok=K)
    common.update({
        "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_experts=E, mlp_only_layers=[1]),
        "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_experts=E,
                          shared_expert_intermediate_size=24),
        "mixtral": dict(intermediate_size=16, num_local_experts=E),
    }[family])
    common.update(overrides)
    return CONFIG_MAPPING[family](**common)


def moe_model(family: str, seed: int = 0, std: float = 0.2, **overrides):
    return random_model(moe_config(family, **overrides), seed, std)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("moe")
    dirs = {}
    for family in FAMILIES:
        d = root / family
        moe_model(family).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[family] = d
    return dirs


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _routing(model, ids=IDS) -> list[torch.Tensor]:
    """The experts every MoE layer's router picks for `ids`."""
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2].clone()))
             for layer in model.model.layers if hasattr(layer.mlp, "gate") and not isinstance(layer.mlp.gate, torch.nn.Linear)]
    try:
        _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _prune(model, windows, stages: list[dict], experts: dict | None = None, min_expert_tokens: int = 1):
    specs = [s.spec for s in recipe_from_dict({"stages": stages}).stages]
    methods = [build_method(s) for s in specs]
    for m in methods[1:]:
        m.nm = specs[0].nm
    run_layerwise(model, get_adapter(model), windows, methods, make_selector([], []), "cpu", 4,
                  min_expert_tokens=min_expert_tokens, experts=experts)


def _matrices(model) -> dict[str, torch.Tensor]:
    """Every weight the methods prune: the layers' Linears but the dense ones, and each expert's matrices."""
    adapter = get_adapter(model)
    out = {}
    for i, layer in enumerate(adapter.layers(model)):
        prefix = adapter.layer_prefix(i)
        out.update({f"{prefix}.{n}": m.weight for n, m in layer.named_modules()
                    if isinstance(m, torch.nn.Linear) and n not in adapter.dense_linears})
        for path, experts in adapter.expert_modules(layer).items():
            out.update({f"{prefix}.{n}": v.weight for n, v in expert_matrices(experts, path).items()})
    return out


def _dense_parts(model) -> dict[str, torch.Tensor]:
    """What stays dense: the routers and the shared-expert gates."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.gate." in n or "shared_expert_gate" in n}


# ---- the adapters and the support matrix ----------------------------------------------------------------

def test_moe_families_have_adapters_and_their_refusals():
    assert set(MOE_MODEL_TYPES) == set(FAMILIES)
    for family in FAMILIES:
        support = method_support(get_adapter(family))
        assert all(support[c] is None for c in ("magnitude", "Wanda", "SparseGPT", "DSnoT", "OWL"))
        for column, needle in (("SliceGPT uniform", "SliceGPT on mixture of experts"),
                               ("structure FFN", "structured pruning of mixture of experts"),
                               ("MaskLLM", "MaskLLM on mixture of experts")):
            assert needle in support[column], column


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_are_every_expert_matrix_and_the_linears_but_the_gates(family):
    from sparsellm.calibrate.engine import layer_targets

    model = moe_model(family)
    adapter = get_adapter(model)
    names = set(layer_targets(adapter, adapter.layers(model)[0], "model.layers.0", make_selector([], [])))
    experts = {f"mlp.experts.{e}.{p}" for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")}
    attn = {f"self_attn.{p}_proj" for p in "qkvo"}
    shared = {f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")} if family == "qwen2_moe" else set()
    assert names == attn | experts | shared  # no router (not a Linear), no shared_expert_gate
    ignored = layer_targets(adapter, adapter.layers(model)[0], "model.layers.0", make_selector([], ["*experts*"]))
    assert set(ignored) == attn | shared
    groups = adapter.groups_for(sorted(names))
    assert [len(g) for g in groups] == [3, 1, 2 * E + (2 if shared else 0), E + (1 if shared else 0)]


# ---- statistics per expert: a hand computation with forced routing ------------------------------------------

class _Probe(LayerwiseMethod):
    """Keeps the statistics the engine hands each target; changes nothing."""
    needs = frozenset({"sq_norm", "hessian"})

    def __init__(self):
        self.stats = {}

    def compress(self, t):
        self.stats[t.name] = t.stats


def test_per_expert_statistics_equal_a_hand_computation_with_forced_routing(windows):
    """The router's rows are a·u (a = 3, 2, −2, −3): a token whose routed hidden state h has h·u > 0 goes to
    experts 0 and 1, one with h·u < 0 to experts 3 and 2. Each expert's statistics (for gate/up: of h; for down:
    of silu(gate·h) ⊙ up·h) are those of exactly its tokens, taken from one plain forward of the whole model."""
    model = moe_model("qwen3_moe", layers=1)
    layer = model.model.layers[0]
    u = torch.nn.functional.normalize(torch.randn(H, generator=torch.Generator().manual_seed(7)), dim=0)
    with torch.no_grad():
        layer.mlp.gate.weight.copy_(10 * torch.tensor([3.0, 2.0, -2.0, -3.0])[:, None] * u[None, :])
    seen = []
    hook = layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, H).clone()))
    try:
        _logits(model, windows)
    finally:
        hook.remove()
    h = seen[0].double()
    s = h @ u.double()
    assert bool((s.abs() > 1e-4).all())  # no token near the boundary
    routed = {0: s > 0, 1: s > 0, 2: s < 0, 3: s < 0}
    probe, info = _Probe(), {}
    run_layerwise(model, get_adapter(model), windows, [probe], make_selector([], []), "cpu", 4, min_expert_tokens=1,
                  experts=info)
    assert info["expert_tokens"] == {"model.layers.0.mlp.experts": [int(routed[e].sum()) for e in range(E)]}
    assert 0 < info["expert_tokens"]["model.layers.0.mlp.experts"][0] < h.shape[0]
    experts, inter = layer.mlp.experts, 16
    for e in range(E):
        x = h[routed[e]]
        gate, up = experts.gate_up_proj[e, :inter].double(), experts.gate_up_proj[e, inter:].double()
        inner = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
        for part, ref in (("gate_proj", x), ("up_proj", x), ("down_proj", inner)):
            st = probe.stats[f"model.layers.0.mlp.experts.{e}.{part}"]
            assert st.tokens == x.shape[0]
            assert torch.allclose(st.sq_norm, (ref ** 2).mean(0), rtol=1e-4, atol=1e-6), (e, part)
            assert torch.allclose(st.hessian, ref.T @ ref / len(ref), rtol=1e-4, atol=1e-6), (e, part)


# ---- the engine's layer inputs are a plain forward's hidden states ---------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_engine_layer_inputs_equal_a_plain_forwards_hidden_states(family, windows):
    model = moe_model(family, layers=4, **({"mlp_only_layers": [1]} if family == "qwen3_moe" else {}))
    assert_engine_layer_inputs_are_a_plain_forwards(model, windows[:4])


# ---- exact counts per expert matrix ----------------------------------------------------------------------

METHOD_STAGES = {
    "magnitude": {"method": "magnitude", "scope": "row"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt", "scope": "row"},
}


def _check_counts(model, sparsity: float | None, nm: tuple[int, int] | None, per_layer: list[float] | None = None):
    mats = _matrices(model)
    assert sum(".experts." in n for n in mats) == 3 * E * sum(
        1 for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    for name, w in mats.items():
        if nm:
            zeros = (w.reshape(w.shape[0], -1, nm[1]) == 0).sum(-1)
            assert bool((zeros == nm[0]).all()), f"{name}: not exactly {nm[0]}:{nm[1]}"
        else:
            s = sparsity if per_layer is None else per_layer[int(name.split(".")[2])]
            per_row = (w == 0).sum(1)
            assert bool((per_row == int(w.shape[1] * s)).all()), f"{name}: per-row zeros {per_row.tolist()}"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", list(METHOD_STAGES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_matrix_gets_its_exact_counts(family, method, pattern, windows):
    model = moe_model(family)
    dense = copy.deepcopy(model)
    gates = _dense_parts(model)
    assert gates
    stage = {**METHOD_STAGES[method], **({"sparsity": 0.5} if pattern == "unstructured" else {"pattern": pattern})}
    _prune(model, windows, [{"prune": stage}])
    assert all(int((w == 0).sum()) == 0 for w in _matrices(dense).values())
    _check_counts(model, 0.5, None if pattern == "unstructured" else (2, 4))
    assert all(torch.equal(p, gates[n]) for n, p in model.named_parameters() if n in gates)
    assert torch.isfinite(_logits(model)).all() and not torch.equal(_logits(model), _logits(dense))


@pytest.mark.parametrize("family", FAMILIES)
def test_dsnot_after_wanda_per_expert_keeps_the_counts(family, windows):
    model = moe_model(family)
    wanda_only = copy.deepcopy(model)
    _prune(wanda_only, windows, [{"prune": {"method": "wanda", "pattern": "2:4"}}])
    _prune(model, windows, [{"prune": {"method": "wanda", "pattern": "2:4"}}, {"refine": {"method": "dsnot", "max_cycles": 5}}])
    _check_counts(model, None, (2, 4))
    ours, theirs = _matrices(model), _matrices(wanda_only)
    assert any(not torch.equal(ours[n], theirs[n]) for n in ours if ".experts." in n)


ALLOCATIONS = {"owl": {"method": "owl", "lambda": 0.1, "M": 3},
               "ecoflap": {"method": "ecoflap", "nsamples": 2, "num_noise": 1, "max_sparsity": 0.7}}


@pytest.mark.parametrize("allocation", list(ALLOCATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_allocation_counts_the_experts_and_every_expert_gets_its_layers_sparsity(family, allocation, windows):
    """OWL scores (and ECoFLaP perturbs) the expert matrices with the layer's Linears; every expert matrix then
    gets its layer's own sparsity exactly, and ECoFLaP restores every weight it perturbed."""
    model = moe_model(family, layers=3)
    dense = copy.deepcopy(model)
    recipe = recipe_from_dict({"stages": [{"allocate": ALLOCATIONS[allocation]},
                                          {"prune": {"method": "wanda", "sparsity": 0.5}}]})
    adapter, select = get_adapter(model), make_selector([], [])
    result = allocate(recipe.stages[0].spec, recipe.stages[1].spec, model, adapter, windows, select, "cpu", 4, 0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), dense.parameters()))
    from sparsellm.allocate import layer_shapes

    sizes = layer_shapes(model, adapter, select)
    assert len(sizes[0]) == 4 + 3 * E + (3 if family == "qwen2_moe" else 0)
    method = build_method(recipe.stages[1].spec, result["sparsity"])
    assert len(set(method.layer_sparsity)) > 1
    run_layerwise(model, adapter, windows, [method], select, "cpu", 4, min_expert_tokens=1)
    _check_counts(model, None, None, per_layer=method.layer_sparsity)


# ---- too few tokens: data-free scores with a warning ----------------------------------------------------------

def test_starved_experts_fall_back_to_magnitude_with_a_warning(windows, caplog):
    """With more tokens required than any expert saw, every expert is pruned by magnitude per row (Wanda with
    unit input norms), the report lists them all, and the attention Linears still use their data."""
    model, by_magnitude = moe_model("mixtral"), moe_model("mixtral")
    info: dict = {}
    with caplog.at_level(logging.WARNING, logger="sparsellm.calibrate.experts"):
        _prune(model, windows, [{"prune": {"method": "wanda", "sparsity": 0.5}}], experts=info, min_expert_tokens=10**6)
    _prune(by_magnitude, windows, [{"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "row"}}])
    ours, theirs = _matrices(model), _matrices(by_magnitude)
    for name in ours:
        if ".experts." in name:
            assert torch.equal(ours[name] == 0, theirs[name] == 0), name
    assert any(not torch.equal(ours[n] == 0, theirs[n] == 0) for n in ours if "self_attn" in n)
    names = [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(E)
             for p in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(info["experts_data_free"]) == sorted(names)
    warned = [r.getMessage() for r in caplog.records if "calibration tokens (< 1000000): data-free" in r.getMessage()]
    assert len(warned) == 2 * E  # once per expert of each layer
    assert "model.layers.1.mlp.experts: expert 3 saw" in " ".join(warned)


# ---- through the pipeline -----------------------------------------------------------------------------------

def _recipe(*stages, nsamples: int = 4, export: dict | None = None, **calibration):
    return recipe_from_dict({"calibration": {"dataset": str(TEXT), "nsamples": nsamples, "seqlen": 32, **calibration},
                             "stages": list(stages), **({"export": export} if export else {})})


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_sparsity_leaves_routing_and_logits_bit_identical(family, moe_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    compress(_recipe({"prune": {"method": "sparsegpt", "sparsity": 0.0}}), out, RunOptions(), str(moe_dirs[family]))
    before = AutoModelForCausalLM.from_pretrained(moe_dirs[family]).eval()
    after = AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    routes_before, routes_after = _routing(before), _routing(after)
    assert routes_before and all(torch.equal(a, b) for a, b in zip(routes_before, routes_after))
    assert torch.equal(_logits(after), _logits(before))


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_2of4_report_lists_expert_tokens_and_export_reloads(family, moe_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report = compress(_recipe({"prune": {"method": "sparsegpt", "pattern": "2:4"}}, min_expert_tokens=8), out,
                      RunOptions(), str(moe_dirs[family]))
    details = report["stages"][0]["details"]
    moe_layers = [0] if family == "qwen3_moe" else [0, 1]
    assert list(details["expert_tokens"]) == [f"model.layers.{i}.mlp.experts" for i in moe_layers]
    for tokens in details["expert_tokens"].values():
        assert len(tokens) == E and sum(tokens) == 4 * 32 * K  # every calibration token, routed to k experts
    assert details["min_expert_tokens"] == 8
    assert details["experts_data_free"] == [f"{m}.{e}.{p}" for m, t in details["expert_tokens"].items()
                                            for e in range(E) if t[e] < 8 for p in ("gate_proj", "up_proj", "down_proj")]
    assert "model.layers.0.mlp.experts.3.down_proj" in report["sparsity"]["per_module"]
    assert report["sparsity"]["per_module"]["model.layers.0.mlp.experts.3.down_proj"] == 0.5
    md = (out / "report.md").read_text()
    assert "Mixture of experts" in md and " ".join(map(str, details["expert_tokens"]["model.layers.0.mlp.experts"])) in md
    assert "min_expert_tokens: 8" in (out / "recipe.yaml").read_text()
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_model(str(out)).model
    assert torch.equal(_logits(stock), _logits(ours))
    _check_counts(stock, None, (2, 4))


def test_default_min_expert_tokens_stays_out_of_the_recipe(moe_dirs, tmp_path):
    recipe = _recipe({"prune": {"method": "magnitude", "sparsity": 0.5}})
    assert recipe.calibration.min_expert_tokens == 128 and "min_expert_tokens" not in recipe.to_yaml()


STORED_DOWN = {"qwen2_moe": "model.layers.0.mlp.experts.3.down_proj",  # what save_pretrained names expert 3's down_proj
               "mixtral": "model.layers.0.block_sparse_moe.experts.3.w2"}


@pytest.mark.parametrize("fmt,family", [("sparse-bitmask", "qwen2_moe"), ("sparse-24-bitmask", "qwen2_moe"),
                                        ("sparse-24-bitmask", "mixtral")])
def test_bitmask_formats_compress_every_expert_and_reload(fmt, family, moe_dirs, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    compress(_recipe({"prune": {"method": "wanda", "pattern": "2:4"}}, export={"format": fmt}),
             out, RunOptions(), str(moe_dirs[family]))
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    experts = {k.rsplit(".", 1)[0] for k in keys if ".experts." in k}
    assert len(experts) == 3 * E * 2 and all(f"{m}.bitmask" in keys and f"{m}.weight" not in keys for m in experts)
    assert STORED_DOWN[family] in experts
    dense = tmp_path / "dense"
    compress(_recipe({"prune": {"method": "wanda", "pattern": "2:4"}}), dense, RunOptions(), str(moe_dirs[family]))
    assert torch.equal(_logits(load_model(str(out)).model), _logits(load_model(str(dense)).model))


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_run_equals_the_in_memory_run(family, moe_dirs, tmp_path):
    """--device-map with MoE layers offloaded to disk: OWL + SparseGPT change the weights accelerate keeps, and the
    output files, perplexity, sparsity and the experts' token counts equal the in-memory run's."""
    from safetensors.torch import load_file

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    recipe = recipe_from_dict({"calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32, "min_expert_tokens": 40},
                               "evaluation": {"ppl": [str(TEXT)], "limit": 4},
                               "stages": [{"allocate": {"method": "owl"}}, {"prune": {"method": "sparsegpt", "sparsity": 0.5}}]})
    whole = compress(recipe, tmp_path / "whole", RunOptions(), str(moe_dirs[family]))
    options = RunOptions(device_map=json.dumps(device_map), offload_folder=str(tmp_path / "offload"))
    off = compress(recipe, tmp_path / "off", options, str(moe_dirs[family]))
    assert (tmp_path / "offload" / "model.layers.0.mlp.experts.gate_up_proj.dat").is_file()
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert off["perplexity"] == whole["perplexity"] and off["sparsity"] == whole["sparsity"]
    assert off["stages"][1]["details"] == whole["stages"][1]["details"]
    assert "model.layers.0.mlp.experts" in off["stages"][1]["details"]["expert_tokens"]


@pytest.mark.parametrize("fmt", ["dense", "sparse-24-bitmask"])
@pytest.mark.parametrize("family", FAMILIES)
def test_low_memory_run_equals_the_in_memory_run(family, fmt, tmp_path, tokenizer):
    """--low-memory reads each layer's experts from their 2-D checkpoint tensors (Mixtral's block_sparse_moe
    names included), fuses them, and writes them back split: the output tensors, perplexity, sparsity and expert
    token counts equal the in-memory run's, in the dense and the 2:4 bitmask format."""
    src = tmp_path / "src"
    moe_model(family, layers=3).save_pretrained(src, max_shard_size="40KB")
    tokenizer.save_pretrained(src)
    stages = [{"allocate": {"method": "owl"}}, {"prune": {"method": "sparsegpt", "pattern": "2:4"}}]
    recipe = recipe_from_dict({"calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32, "min_expert_tokens": 40},
                               "evaluation": {"ppl": [str(TEXT)], "limit": 4}, "stages": stages, "export": {"format": fmt}})
    whole = compress(recipe, tmp_path / "whole", RunOptions(low_memory=False), str(src))
    low = compress(recipe, tmp_path / "low", RunOptions(low_memory=True), str(src))
    assert low["low_memory"] is not None and whole["low_memory"] is None
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "low")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".experts." in k for k in a) and not any("gate_up_proj" in k for k in a)
    assert low["perplexity"] == whole["perplexity"] and low["sparsity"] == whole["sparsity"]
    assert low["stages"][1]["details"] == whole["stages"][1]["details"]
    from transformers import AutoModelForCausalLM

    if fmt == "dense":
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "low").eval()),
                           _logits(load_model(str(tmp_path / "whole")).model))


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_of_every_expert_keeps_masks_in_every_memory_mode(family, tmp_path, tokenizer):
    """The reconstruct stage trains the fused 3-D expert weights under their masks; streamed, the dense
    teacher's experts are re-read from their 2-D checkpoint tensors and fused (as the layer walk does);
    offloaded, from the scratch copy."""
    src = tmp_path / "src"
    moe_model(family, layers=3).save_pretrained(src, max_shard_size="40KB")
    tokenizer.save_pretrained(src)
    assert_reconstruction_keeps_masks_in_every_memory_mode(src, tmp_path, min_expert_tokens=1)


# ---- refusals -------------------------------------------------------------------------------------------------

def _run(folder, stage: dict, tmp_path, *flags):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16}, "stages": [stage]}))
    return CliRunner().invoke(cli, ["prune", "--model", str(folder), "--recipe", str(recipe), "-o", str(tmp_path / "o"),
                                    *flags])


def _assert_refused(r, tmp_path, code: int, needle: str):
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert r.exit_code == code, r.output
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage,needle", [
    ({"slice": {"method": "slicegpt", "slicing": 0.2}}, "SliceGPT on mixture of experts"),
    ({"slice": {"method": "slicegpt", "slicing": 0.2, "rotation": "uniform"}}, "SliceGPT on mixture of experts"),
    ({"structure": {"method": "magnitude", "ffn": 0.25}}, "structured pruning of mixture of experts"),
    ({"structure": {"method": "wanda-sp", "ffn": 0.25, "uniform": True}}, "structured pruning of mixture of experts"),
    ({"learn": {"method": "maskllm", "pattern": "2:4", "steps": 1}}, "MaskLLM on mixture of experts"),
])
def test_methods_that_do_not_apply_are_refused_in_one_line(stage, needle, moe_dirs, tmp_path):
    _assert_refused(_run(moe_dirs["qwen3_moe"], stage, tmp_path), tmp_path, 4, needle)


@pytest.mark.parametrize("stage,needle", [
    ({"slice": {"method": "slicegpt", "slicing": 0.2}}, "SliceGPT on mixture of experts"),
    ({"structure": {"method": "wanda-sp", "ffn": 0.25, "uniform": True}}, "structured pruning of mixture of experts"),
    ({"learn": {"method": "maskllm", "pattern": "2:4", "steps": 1}}, "MaskLLM on mixture of experts"),
])
def test_family_refusals_come_from_config_before_any_weight_is_read(stage, needle, moe_dirs, tmp_path, monkeypatch):
    import sparsellm.pipeline as pipeline

    def no_load(*a, **k):
        raise AssertionError("the model was opened before the recipe was checked against its family")

    monkeypatch.setattr(pipeline, "open_model", no_load)
    _assert_refused(_run(moe_dirs["mixtral"], stage, tmp_path), tmp_path, 4, needle)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_hessians_in_chunks_give_the_same_bits(family, windows, monkeypatch):
    """SparseGPT's per-expert XᵀX taken a few experts at a time (a bound far below the experts' total) gives the
    bits of the one-pass collection, and the report's expert token counts."""
    from sparsellm.calibrate import engine

    def run():
        model = moe_model(family)
        spec = recipe_from_dict({"stages": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}]}).stages[0].spec
        report: dict = {}
        run_layerwise(model, get_adapter(model), windows, [build_method(spec)], make_selector([], []), batch_size=2,
                      min_expert_tokens=1, experts=report)
        return model, report

    whole, whole_report = run()
    experts = get_adapter(whole).expert_modules(get_adapter(whole).layers(whole)[0])
    (mod,) = experts.values()
    one_expert = mod.gate_up_proj.shape[-1] ** 2 * 8 * 2
    monkeypatch.setattr(engine, "EXPERT_STATS_BYTES", one_expert)  # one expert per statistics pass
    calls = []
    real = engine.collect_stats
    monkeypatch.setattr(engine, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    chunked, chunked_report = run()
    assert len(calls) >= mod.gate_up_proj.shape[0] * len(get_adapter(chunked).layers(chunked))
    for (n, a), b in zip(whole.state_dict().items(), chunked.state_dict().values()):
        assert torch.equal(a, b), n
    assert chunked_report == whole_report
