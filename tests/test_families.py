"""The model families of issue 17 (Qwen3, SmolLM3, Gemma 2/3, Phi-3, OLMo-2, Granite) on tiny random models
built from their configs: every applicable method and pattern gives its exact counts, 0 % changes nothing,
exports reload with stock transformers to identical logits, reconstruction keeps the masks in every memory mode,
structured results keep their family's stock architecture, refusals are one line with their exit code, and the support table in docs is the adapters'."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import TEXT
from sparsellm.allocate import allocate
from sparsellm.calibrate import make_selector, run_layerwise
from sparsellm.cli import cli
from sparsellm.compress import build_method, build_structured
from sparsellm.compress.slicegpt import slicegpt
from sparsellm.compress.structured import keep_channels, structure
from sparsellm.errors import UnsupportedArchitectureError
from sparsellm.export import save_model
from sparsellm.loading import get_adapter, load_model
from sparsellm.loading.adapters import ADAPTERS, MOE_MODEL_TYPES, gguf_model_type, support_matrix
from sparsellm.pipeline import RunOptions, compress
from sparsellm.recipe import SliceGPTSlice, recipe_from_dict

FAMILIES = ("qwen3", "smollm3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")
SLICEABLE = ("qwen3", "smollm3", "phi3")  # uniform rotation; the others are refused (see the adapters)
DOCS = Path(__file__).parent.parent / "docs"
IDS = torch.randint(2, 320, (2, 24), generator=torch.Generator().manual_seed(1))


def family_config(family: str, layers: int = 2, vocab: int = 320, **overrides):
    """A tiny config of `family`: hidden 64, 4 query heads in 2 KV groups of head_dim 16, FFN 128. Gemma gets a
    sliding window (8) shorter than the test sequences, so sliding and global layers really differ; SmolLM3
    skips rotary embeddings every other layer; Granite's multipliers are away from 1."""
    from transformers import CONFIG_MAPPING

    kinds = (["sliding_attention", "full_attention"] * layers)[:layers]
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=1, pad_token_id=None)
    common.update({
        "qwen3": {},
        "smollm3": dict(no_rope_layers=([1, 0] * layers)[:layers]),
        "gemma2": dict(sliding_window=8, layer_types=kinds, query_pre_attn_scalar=16),
        "gemma3_text": dict(sliding_window=8, layer_types=kinds, query_pre_attn_scalar=16),
        "phi3": {},
        "olmo2": {},
        "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
    }[family])
    common.update(overrides)
    return CONFIG_MAPPING[family](**common)


def random_model(config, seed: int = 0, std: float = 0.2):
    """A float32 model of `config`: matrices (and 3-D expert parameters) N(0, std²), norm scales away from
    their defaults."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std, generator=g)
            elif "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval().requires_grad_(False)


def family_model(family: str, seed: int = 0, std: float = 0.2, **overrides):
    """A random model of family_config(family) (see random_model)."""
    return random_model(family_config(family, **overrides), seed, std)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _spec(stage: dict):
    return recipe_from_dict({"stages": [stage]}).stages[0].spec


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family in FAMILIES:
        d = root / family
        family_model(family).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[family] = d
    return dirs


# ---- the adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_knows_every_linear_of_the_family(family):
    model = family_model(family, layers=3)
    adapter = get_adapter(model)
    assert family in adapter.model_types and len(adapter.layers(model)) == 3
    for layer in adapter.layers(model):
        linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears == {n for g in adapter.sequential_groups for n in g}
    # the per-layer attention kinds are the ones the model's forward keys its masks by
    kinds = adapter.attention_kinds(model.config)
    assert kinds == list(getattr(model.config, "layer_types", None) or ["full_attention"] * 3)[:3]


def _llama_twin(phi):
    """A Llama model holding Phi-3's fused rows (per Adapter.fused_parts) as separate q/k/v and gate/up."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    adapter, cfg = get_adapter(phi), phi.config
    llama = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=cfg.rope_parameters, hidden_act=cfg.hidden_act, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=None), dtype=torch.float32).eval()
    sd = {}
    for name, t in phi.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        rel = stem.split(".", 3)[-1] if stem.startswith("model.layers.") else None
        if rel is not None and adapter.fused_kind(rel):
            for part, rows in adapter.fused_parts(stem, cfg):
                assert part.startswith(stem.rpartition(".")[0])
                sd[f"{part}.{leaf}"] = t[rows]
        else:
            sd[name] = t
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return llama.requires_grad_(False)


def test_fused_parts_are_the_rows_phi3_splits():
    """The Llama twin computes Phi-3's logits: fused_parts names the right row ranges."""
    phi = family_model("phi3")
    assert torch.allclose(_logits(_llama_twin(phi)), _logits(phi), atol=1e-5)


@pytest.mark.parametrize("stage", [{"method": "magnitude", "sparsity": 0.5, "scope": "layer"},
                                   {"method": "sparsegpt", "sparsity": 0.5, "scope": "block", "blocksize": 16}])
def test_fused_parts_compressed_as_views_match_separate_projections(stage):
    """Rules that compare across rows (magnitude scope: layer, SparseGPT scope: block) pool q, k and v of a fused
    matrix; compressing each part through a row view of the fused weight (what the engine can do with
    fused_parts) gives exactly the result on separate projections."""
    from sparsellm.loading.experts import ExpertMatrix
    from sparsellm.calibrate.stats import InputStats
    from sparsellm.compress.base import Target

    phi = family_model("phi3")
    llama = _llama_twin(phi)
    adapter = get_adapter(phi)
    spec = _spec({"prune": stage})
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    stats = InputStats(64, frozenset({"sq_norm", "hessian"}))
    stats.update(x)
    for fused in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        lin = phi.model.layers[0].get_submodule(fused)
        for part, rows in adapter.fused_parts(fused, phi.config):
            build_method(spec).compress(Target(part, 0, ExpertMatrix(lin.weight.detach()[rows]), stats))
            ref = llama.model.layers[0].get_submodule(part)
            build_method(spec).compress(Target(part, 0, ref, stats))
            assert torch.equal(lin.weight[rows], ref.weight), part
        whole = family_model("phi3").model.layers[0].get_submodule(fused)
        build_method(spec).compress(Target(fused, 0, whole, stats))
        assert not torch.equal(whole.weight, lin.weight)  # pooled across parts: a different result


@pytest.mark.parametrize("family", ["gemma2", "granite", "qwen3"])
def test_head_logits_apply_the_family_transform(family):
    """Soft-capping (Gemma 2) and logits_scaling (Granite) happen after lm_head in the causal-LM forward:
    head_logits reproduces the model's logits from the last decoder layer's output."""
    model = family_model(family)
    adapter = get_adapter(model)
    seen = []
    handle = adapter.layers(model)[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    ref = _logits(model)
    handle.remove()
    with torch.no_grad():
        ours = adapter.head_logits(model, seen[0])
    assert torch.allclose(ours, ref, atol=1e-5)
    if family != "qwen3":  # the transform matters: the bare head differs
        with torch.no_grad():
            bare = seen[0]
            for m in adapter.head_modules(model):
                bare = m(bare)
        assert not torch.allclose(bare, ref, atol=1e-3)


def test_gguf_architecture_names_map_to_model_types(tmp_path):
    """GGUF calls Gemma 3 `gemma3` (transformers: gemma3_text): the early GGUF check must accept it."""
    import gguf
    import numpy as np

    from sparsellm.loading.models import check_gguf

    assert gguf_model_type("gemma3") == "gemma3_text" and gguf_model_type("gemma2") == "gemma2"
    assert gguf_model_type("qwen2moe") == "qwen2_moe" and gguf_model_type("qwen3moe") == "qwen3_moe"
    assert gguf_model_type("phi3") == "phi3" and gguf_model_type("qwen3") == "qwen3"
    assert gguf_model_type("llama") == "llama" and gguf_model_type("rwkv6") is None
    for arch, ok in (("gemma3", True), ("qwen3moe", True), ("rwkv6", False)):
        path = tmp_path / f"{arch}.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if ok:
            check_gguf(path, str(path))
        else:
            with pytest.raises(UnsupportedArchitectureError, match="'rwkv6' model"):
                check_gguf(path, str(path))


def test_support_matrix_in_docs_is_the_adapters():
    """docs/support-matrix.md carries support_matrix() verbatim below its marker line; regenerate with
    python -c "from sparsellm.loading.adapters import support_matrix; print(support_matrix(), end='')"."""
    text = (DOCS / "support-matrix.md").read_text(encoding="utf-8")
    marker = "<!-- generated: sparsellm.loading.adapters.support_matrix() -->\n"
    assert marker in text
    assert text.split(marker, 1)[1] == support_matrix()
    for a in ADAPTERS:
        assert f"| {a.name} ({', '.join(a.model_types)}) |" in text
    assert all(t in text for t in MOE_MODEL_TYPES)


def test_readme_support_table_is_the_adapters():
    """README's family x method table is the table part of support_matrix(), verbatim."""
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    start = "<!-- support table: generated from sparsellm/loading/adapters.py (tests/test_families.py keeps it current) -->\n"
    block = readme.split(start, 1)[1].split("<!-- end of support table -->", 1)[0]
    assert block.strip("\n") == support_matrix().split("\n\n")[0].strip("\n")


# ---- per-Linear methods: exact counts ----------------------------------------------------------------

def _prune(model, windows, stages: list[dict]):
    specs = [s.spec for s in recipe_from_dict({"stages": stages}).stages]
    methods = [build_method(s) for s in specs]
    for m in methods[1:]:  # a refine stage works in the comparison groups of the prune stage before it (as the pipeline)
        m.nm = specs[0].nm
    run_layerwise(model, get_adapter(model), windows, methods, make_selector([], []), "cpu", 4)


def _check_counts(model, dense, sparsity: float | None, nm: tuple[int, int] | None):
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers(model)):
        for name, lin in layer.named_modules():
            if not isinstance(lin, torch.nn.Linear):
                continue
            w = lin.weight
            assert int((dense.get_submodule(f"{adapter.layer_prefix(i)}.{name}").weight == 0).sum()) == 0
            if nm:
                zeros = (w.reshape(w.shape[0], -1, nm[1]) == 0).sum(-1)
                assert bool((zeros == nm[0]).all()), f"{name}: not exactly {nm[0]}:{nm[1]}"
            else:
                per_row = (w == 0).sum(1)
                assert bool((per_row == int(w.shape[1] * sparsity)).all()), f"{name}: per-row zeros {per_row.tolist()}"


METHOD_STAGES = {
    "magnitude": {"method": "magnitude", "scope": "row"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt", "scope": "row"},
}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", list(METHOD_STAGES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_gives_exact_counts(family, method, pattern, windows):
    model = family_model(family)
    dense = copy.deepcopy(model)
    stage = {**METHOD_STAGES[method], **({"sparsity": 0.5} if pattern == "unstructured" else {"pattern": pattern})}
    _prune(model, windows, [{"prune": stage}])
    _check_counts(model, dense, 0.5, None if pattern == "unstructured" else (2, 4))
    assert torch.isfinite(_logits(model)).all() and not torch.equal(_logits(model), _logits(dense))


@pytest.mark.parametrize("family", FAMILIES)
def test_dsnot_after_wanda_keeps_the_counts(family, windows):
    model = family_model(family)
    dense = copy.deepcopy(model)
    wanda_only = copy.deepcopy(model)
    _prune(wanda_only, windows, [{"prune": {"method": "wanda", "pattern": "2:4"}}])
    _prune(model, windows, [{"prune": {"method": "wanda", "pattern": "2:4"}}, {"refine": {"method": "dsnot", "max_cycles": 5}}])
    _check_counts(model, dense, None, (2, 4))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), wanda_only.parameters()))


# ---- through the pipeline: 0 %, OWL, export and reload ------------------------------------------------

def _recipe(*stages, nsamples: int = 4):
    return recipe_from_dict({"calibration": {"dataset": str(TEXT), "nsamples": nsamples, "seqlen": 32},
                             "stages": list(stages)})


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_sparsity_leaves_logits_bit_identical(family, family_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    compress(_recipe({"prune": {"method": "wanda", "sparsity": 0.0}}), out, RunOptions(), str(family_dirs[family]))
    before = AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    after = AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    assert torch.equal(_logits(after), _logits(before))


@pytest.mark.parametrize("family", FAMILIES)
def test_owl_wanda_run_exports_a_stock_model_with_identical_logits(family, family_dirs, tmp_path, windows):
    """OWL's per-layer sparsities (exact per row at each layer's own sparsity), exported as the family's stock
    architecture; stock transformers reloads it to the logits of the in-memory result."""
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(family_dirs[family]))
    model = loaded.model
    dense = copy.deepcopy(model)
    recipe = _recipe({"allocate": {"method": "owl", "lambda": 0.1, "M": 3}}, {"prune": {"method": "wanda", "sparsity": 0.5}})
    adapter = get_adapter(model)
    method = build_method(recipe.stages[1].spec)
    select = make_selector([], [])
    method.layer_sparsity = allocate(recipe.stages[0].spec, recipe.stages[1].spec, model, adapter, windows, select,
                                     "cpu", 4, 0)["sparsity"]
    assert len(set(method.layer_sparsity)) > 1
    run_layerwise(model, adapter, windows, [method], select, "cpu", 4)
    for i, layer in enumerate(adapter.layers(model)):
        for name, lin in layer.named_modules():
            if isinstance(lin, torch.nn.Linear):
                assert bool(((lin.weight == 0).sum(1) == int(lin.in_features * method.layer_sparsity[i])).all())
    save_model(model, loaded.tokenizer, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(stock).__name__ == type(dense).__name__
    assert torch.equal(_logits(stock), _logits(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_sparsegpt_2of4_report_and_reload(family, family_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report = compress(_recipe({"prune": {"method": "sparsegpt", "pattern": "2:4"}}), out, RunOptions(),
                      str(family_dirs[family]))
    assert abs(report["sparsity"]["overall"] - 0.5) < 1e-9
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_model(str(out)).model
    # Gemma always runs after BOS: its calibration windows start with it, as its evaluation chunks do
    assert report["calibration"].get("bos", False) == get_adapter(ours).needs_bos == family.startswith("gemma")
    assert torch.equal(_logits(stock), _logits(ours))
    for name, p in stock.named_parameters():
        if ".layers." in name and p.dim() == 2:
            assert bool(((p.reshape(p.shape[0], -1, 4) == 0).sum(-1) == 2).all()), name


def assert_reconstruction_keeps_masks_in_every_memory_mode(src, tmp_path, pattern: str = "2:4", **calibration):
    """SparseGPT 2:4 then the reconstruct stage, held whole, streamed (--low-memory, the dense teacher re-read
    from the source shards) and offloaded by accelerate (--device-map, decoder layers 1.. and the embeddings on
    disk): every matrix keeps the pruned start's zeros exactly, the kept weights move, no block's held-out
    error ends above its start, and the three memory modes write the same bytes."""
    from test_lowmem import offload_map, tensors

    cal = {"dataset": str(TEXT), "nsamples": 8, "seqlen": 32, "batch_size": 4, **calibration}
    prune = {"prune": {"method": "sparsegpt", "pattern": pattern}}
    rec = {"reconstruct": {"method": "blockwise", "lr": 0.05, "epochs": 2, "batch_size": 2, "holdout": 0.25}}

    def run(name, stages, **options):
        r = recipe_from_dict({"seed": 0, "calibration": cal, "evaluation": {"ppl": [], "before": False}, "stages": stages})
        return compress(r, tmp_path / name, RunOptions(**options), str(src))

    run("pruned", [prune])
    modes = {"whole": {}, "low": {"low_memory": True},
             "off": {"device_map": json.dumps(offload_map(src)), "offload_folder": str(tmp_path / "offload")}}
    reports = {m: run(m, [prune, rec], **o) for m, o in modes.items()}
    assert list((tmp_path / "offload").glob("model.layers.1.*.dat"))  # offloaded, trained weights written back
    assert not list((tmp_path / "offload").glob("sparsellm-dense-*"))  # the dense scratch copy is removed
    start, a = tensors(tmp_path / "pruned"), tensors(tmp_path / "whole")
    for k in a:
        if a[k].dim() >= 2:  # the matrices (biases and norms are trained freely)
            assert torch.equal(a[k] == 0, start[k] == 0), k  # nothing pruned came back, nothing kept was pruned
    assert sum(not torch.equal(a[k], start[k]) for k in a if ".layers." in k) > 0
    whole = reports["whole"]
    blocks = whole["stages"][1]["details"]["blocks"]
    for m in ("low", "off"):
        b = tensors(tmp_path / m)
        assert sorted(start) == sorted(a) == sorted(b), m
        assert all(torch.equal(a[k], b[k]) for k in a), m
        assert reports[m]["sparsity"] == whole["sparsity"], m
        assert reports[m]["stages"][1]["details"]["blocks"] == blocks, m
    parts = [p for b in blocks for k, p in b.items() if k != "layer"]
    assert all(p["heldout_after"] <= p["heldout_before"] for p in parts), parts
    assert any(p["heldout_after"] < p["heldout_before"] for p in parts), parts


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_keeps_masks_in_every_memory_mode(family, family_dirs, tmp_path):
    assert_reconstruction_keeps_masks_in_every_memory_mode(family_dirs[family], tmp_path)


# ---- per-layer forward arguments --------------------------------------------------------------------

def assert_engine_layer_inputs_are_a_plain_forwards(model, windows):
    """Layer by layer, the hidden states the engine feeds each decoder layer during calibration are those of
    one plain forward of the whole model (output_hidden_states=True). Wanda at 0 % leaves the weights as they
    are, so the plain forward of the dense model is the reference."""
    adapter = get_adapter(model)
    with torch.no_grad():
        ref = model(windows, output_hidden_states=True, use_cache=False).hidden_states
    seen: dict[int, list[torch.Tensor]] = {}

    def record(index):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(index, []).append(h.detach().clone())
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(adapter.layers(model))]
    try:
        _prune(model, windows, [{"prune": {"method": "wanda", "sparsity": 0.0}}])
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(len(adapter.layers(model))))
    for i in seen:
        captured = seen[i][0]  # the first call of layer i: collecting its statistics, on the whole batch
        assert captured.shape == ref[i].shape
        assert torch.allclose(captured, ref[i], atol=1e-5), f"layer {i}: max diff {(captured - ref[i]).abs().max()}"


@pytest.mark.parametrize("family", [
    "gemma3_text", "gemma2", "qwen3", "smollm3", "granite",
])
def test_engine_layer_inputs_equal_a_plain_forwards_hidden_states(family, windows):
    assert_engine_layer_inputs_are_a_plain_forwards(family_model(family, layers=4), windows[:4])


# ---- structured pruning --------------------------------------------------------------------------------

def _assert_kv_cache_generate_matches(model):
    prompt = IDS[:1, :8]
    gen = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, _logits(model, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)


def test_fused_gate_up_channels_equal_zeroing_their_down_columns():
    """Removing FFN channels of Phi-3 cuts both halves of gate_up_proj: the logits are those of the dense model
    with the channels' down_proj columns zeroed."""
    model = family_model("phi3")
    adapter = get_adapter(model)
    names = adapter.structure_names(model)
    assert names["fused"] == {"self_attn.qkv_proj": 3, "mlp.gate_up_proj": 2}
    masked = copy.deepcopy(model)
    chans = [3, 10, 50, 127]
    keep = torch.tensor([c for c in range(128) if c not in chans])
    for pruned, ref in zip(adapter.layers(model), adapter.layers(masked)):
        keep_channels(pruned, names, keep)
        ref.mlp.down_proj.weight[:, chans] = 0
        assert pruned.mlp.gate_up_proj.weight.shape == (248, 64) and pruned.mlp.down_proj.weight.shape == (64, 124)
        w = ref.mlp.gate_up_proj.weight
        assert torch.equal(pruned.mlp.gate_up_proj.weight, torch.cat([w[:128][keep], w[128:][keep]]))
    assert torch.allclose(_logits(model), _logits(masked), atol=1e-5)


STRUCTURE = {f: {"ffn": 0.25, "heads": 0.5} for f in FAMILIES} | {"phi3": {"ffn": 0.25}}


@pytest.mark.parametrize("method", ["wanda-sp", "magnitude"])
@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_structure_exports_the_stock_family_and_generates(family, method, tmp_path, windows, tokenizer):
    from transformers import AutoModelForCausalLM

    model = family_model(family)
    spec = _spec({"structure": {"method": method, "uniform": True, "round_to": 8, **STRUCTURE[family]}})
    details = structure(model, get_adapter(model), windows, spec, build_structured(spec), "cpu", 4)
    assert details["stock_architecture"] and details["intermediate_size"] == [96, 96]
    if "heads" in STRUCTURE[family]:
        assert details["kv_groups"] == [1, 1] and model.config.num_key_value_heads == 1
        assert model.config.num_attention_heads == 2
    save_model(model, tokenizer, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["intermediate_size"] == 96 and "auto_map" not in cfg
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(stock), _logits(model))
    _assert_kv_cache_generate_matches(stock)


def test_olmo2_head_removal_cuts_its_projection_norms(windows):
    model = family_model("olmo2")
    spec = _spec({"structure": {"method": "magnitude", "uniform": True, "heads": 0.5}})
    structure(model, get_adapter(model), windows, spec, build_structured(spec), "cpu", 4)
    for layer in model.model.layers:
        assert layer.self_attn.q_norm.weight.shape == (2 * 16,) and layer.self_attn.k_norm.weight.shape == (16,)


# ---- SliceGPT ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", SLICEABLE)
def test_slicegpt_uniform_at_zero_slicing_reproduces_logits(family):
    model = family_model(family)
    ref = _logits(model)
    slicegpt(model, get_adapter(model), IDS, SliceGPTSlice(method="slicegpt", slicing=0.0, rotation="uniform",
                                                           round_to=1), "cpu", 2)
    assert (_logits(model) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("family", SLICEABLE)
def test_slicegpt_uniform_exports_the_stock_family(family, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = family_model(family)
    slicegpt(model, get_adapter(model), IDS, SliceGPTSlice(method="slicegpt", slicing=0.25, rotation="uniform",
                                                           round_to=8), "cpu", 2)
    save_model(model, tokenizer, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["hidden_size"] == 48
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(stock), _logits(model))


PER_LAYER_SLICE = {"slice": {"method": "slicegpt", "slicing": 0.25, "rotation": "per-layer"}}
PER_LAYER_STRUCTURE = {"structure": {"method": "cfsp", "ffn": 0.5, "heads": 0.5, "uniform": False, "a": 5.0}}


@pytest.mark.parametrize("family,stage", [
    ("qwen3", PER_LAYER_SLICE), ("smollm3", PER_LAYER_SLICE),
    *((f, PER_LAYER_STRUCTURE) for f in ("qwen3", "smollm3")),
    *((f, {"structure": {"method": "cfsp", "ffn": 0.5, "heads": 0.5, "uniform": False, "a": 50.0, "round_to": 1}})
      for f in ("gemma2", "gemma3_text", "granite", "olmo2")),
    ("phi3", {"structure": {"method": "cfsp", "ffn": 0.5, "uniform": False, "a": 50.0, "round_to": 1}}),  # fused qkv: FFN only
])
def test_per_layer_shapes_reload_with_the_runtime(family, stage, family_dirs, tmp_path):
    """The sliced runtime (modeling_sliced.py) covers Qwen3 (q/k norms per head) and SmolLM3 (layers without
    rotary) for SliceGPT and structure, and Gemma 2/3 (four norms, sliding layers), Granite (multipliers),
    OLMo-2 (q/k norms over the whole projection, cut with the heads) and Phi-3 (fused gate_up_proj) for
    per-layer structured widths: the result reloads with stock transformers (trust_remote_code, the folder's
    copy of the runtime) and with sparsellm to the logits of the in-memory result, and KV-cache generation
    equals step-by-step recomputation."""
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(family_dirs[family]))
    recipe = _recipe(stage)
    out = tmp_path / "out"
    compress(recipe, out, RunOptions(), str(family_dirs[family]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == f"sparsellm_sliced_{family}" and (out / "modeling_sliced.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ours = load_model(str(out)).model
    assert type(plain).__module__ != type(ours).__module__
    assert torch.equal(_logits(plain), _logits(ours))
    if "slice" in stage:  # the same slicing in memory gives the reloaded model
        from sparsellm.data import calibration_windows

        windows = calibration_windows(loaded.tokenizer, str(TEXT), 4, 32, 0)
        slicegpt(loaded.model, get_adapter(loaded.model), windows, recipe.stages[0].spec, "cpu", 8)
        assert torch.equal(_logits(loaded.model), _logits(ours))
    else:  # really per-layer widths, which no stock config states
        assert len({json.dumps(d, sort_keys=True) for d in cfg["sparsellm_structure"]["layers"]}) > 1
    _assert_kv_cache_generate_matches(plain)


# ---- refusals: one line, documented exit code, nothing written -------------------------------------------

def _run(folder, stage: dict, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16}, "stages": [stage]}))
    return CliRunner().invoke(cli, ["prune", "--model", str(folder), "--recipe", str(recipe), "-o", str(tmp_path / "o")])


def _assert_refused(r, tmp_path, code: int, needle: str):
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert r.exit_code == code, r.output
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family,needle", [
    ("gemma2", "Gemma 2 also normalises each block's output"),
    ("gemma3_text", "Gemma 3 also normalises each block's output"),
    ("olmo2", "OLMo-2 normalises each block's output"),
    ("granite", "residual_multiplier"),
])
def test_slicegpt_refused_where_its_fusion_does_not_apply(family, needle, family_dirs, tmp_path):
    _assert_refused(_run(family_dirs[family], {"slice": {"method": "slicegpt", "slicing": 0.2}}, tmp_path), tmp_path, 4,
                    needle)


def test_per_layer_shapes_refused_outside_the_runtime(family_dirs, tmp_path):
    _assert_refused(_run(family_dirs["phi3"], {"slice": {"method": "slicegpt", "slicing": 0.2}}, tmp_path), tmp_path,
                    4, "use rotation: uniform")


def test_phi3_head_removal_refused(family_dirs, tmp_path):
    _assert_refused(_run(family_dirs["phi3"], {"structure": {"method": "magnitude", "heads": 0.5, "uniform": True}},
                         tmp_path), tmp_path, 4, "use heads: 0")


def _fake_hub(src: Path, tmp_path, monkeypatch) -> list[str]:
    """hf_hub_download serving the files of `src` and refusing all but config.json; returns what was requested."""
    import transformers.utils.hub as hub

    requested = []

    def fake_download(repo_id, filename, *args, cache_dir=None, **kwargs):
        """What huggingface_hub leaves behind: the file in the cache's snapshot of the repo's main revision."""
        requested.append(filename)
        if filename != "config.json":
            raise AssertionError(f"requested {filename}")
        repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text("0" * 40)
        (repo / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
        target = repo / "snapshots" / ("0" * 40) / filename
        target.write_text((src / filename).read_text())
        return str(target)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "is_offline_mode", lambda: False, raising=False)
    return requested


def test_hub_id_of_unsupported_architecture_refused_after_only_its_config(tmp_path, monkeypatch):
    """The config is downloaded first and checked; no weight file (nor anything else) is requested."""
    from transformers import GPT2Config

    src = tmp_path / "hub"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320).save_pretrained(src)
    requested = _fake_hub(src, tmp_path, monkeypatch)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2'"):
        load_model("sparsellm-tests/gpt2-like")
    assert requested == ["config.json"]


def test_hub_id_of_a_family_a_stage_cannot_take_refused_after_only_its_config(family_dirs, tmp_path, monkeypatch):
    """SliceGPT on a Gemma 3 hub id: refused from its config.json, before any weight is requested."""
    requested = _fake_hub(family_dirs["gemma3_text"], tmp_path, monkeypatch)
    _assert_refused(_run("sparsellm-tests/gemma3-like", {"slice": {"method": "slicegpt", "slicing": 0.2, "rotation": "uniform"}},
                         tmp_path), tmp_path, 4, "SliceGPT")
    assert requested == ["config.json"]
