"""Structured pruning (CFSP, Wanda-sp, magnitude), LoRA recovery and the export of per-layer widths."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import TEXT, tiny_model
from sparsellm.cli import cli
from sparsellm.compress import build_structured
from sparsellm.compress.cfsp import angular_distance, cfsp_scores, coarse_keep
from sparsellm.compress.structured import (MagnitudeSP, WandaSP, keep_channels, keep_groups, round_widths, structure,
                                           top_units, uniform_width)
from sparsellm.data import calibration_windows
from sparsellm.loading import get_adapter, load_model
from sparsellm.pipeline import RunOptions, compress
from sparsellm.recipe import recipe_from_dict
from sparsellm.recover.lora import attach, block_ranks, merge, train

IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _assert_kv_cache_generate_matches(model):
    """Greedy generate (KV cache) gives the tokens of full forwards one step at a time."""
    prompt = IDS[:1, :8]
    gen = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, _logits(model, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)


def _spec(**kw):
    return recipe_from_dict({"stages": [{"structure": kw}]}).stages[0].spec


def _lora_spec(**kw):
    return recipe_from_dict({"stages": [{"structure": {"method": "magnitude", "ffn": 0.5}},
                                        {"recover": {"method": "lora", **kw}}]}).stages[1].spec


# ---- pure functions ----------------------------------------------------------------------------

def test_round_widths_hits_the_total_in_multiples():
    ideal = [100.0, 60.0, 20.0, 140.0]  # sum 320, full 128
    w = round_widths(ideal, full=128, multiple=8)
    assert all(x % 8 == 0 and 8 <= x <= 128 for x in w) and sum(w) == 320
    # floors [96, 56, 16, 136 -> capped 128] sum to 296: 3 units of 8 are left; the largest remainder (140 - 128)
    # cannot grow past full, so they go to the next ones, 4 each, earlier blocks first
    assert w == [104, 64, 24, 128]
    assert round_widths([2.5, 2.5, 2.0], full=4) == [3, 2, 2]  # ties: the earlier block first
    assert round_widths([0.2, 0.2], full=4) == [1, 1]  # never empty
    assert uniform_width(128, 0.2, 8) == 104 and uniform_width(1536, 0.5, 128) == 768 and uniform_width(9, 0.99) == 1
    with pytest.raises(ValueError, match="round_to 256 exceeds"):
        round_widths([10.0], 128, 256)


def test_coarse_keep_mean_cap_and_order():
    d = [0.30, 0.05, 0.10, 0.12, 0.40]
    for target in (0.2, 0.5):
        keep = coarse_keep(d, target, a=25.0)
        assert abs(sum(keep) / len(keep) - (1 - target)) < 1e-12  # the budget is the target exactly
        assert max(keep) <= 1.0 + 1e-12 and min(keep) > 0
        assert sorted(range(5), key=lambda i: keep[i]) == sorted(range(5), key=lambda i: d[i])  # more change keeps more
    assert coarse_keep(d, 0.2, a=0.0) == pytest.approx([0.8] * 5)
    capped = coarse_keep(d, 0.2, a=100.0, max_keep=0.9)
    assert max(capped) == pytest.approx(0.9) and sum(capped) / 5 == pytest.approx(0.8)
    with pytest.raises(ValueError, match="max_keep"):
        coarse_keep(d, 0.2, a=1.0, max_keep=0.7)


def test_angular_distance_hand_cases():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    y = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    assert angular_distance(x, y).tolist() == pytest.approx([0.5, 1.0, 0.0], abs=1e-7)


def test_channel_scores_hand_cases():
    down = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # hidden 2 x channels 2
    gate = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # channels x hidden
    sq = torch.tensor([4.0, 1.0])  # activation norms 2 and 1
    assert WandaSP(None).column_scores(down, [gate], sq).tolist() == pytest.approx([8.0, 2.0])
    assert MagnitudeSP(None).column_scores(down, [gate], sq).tolist() == pytest.approx([12.0, 8.0])
    # CFSP, b = c = 1: |down|·a = [[2, 2], [6, 0]] -> row shares [[.5, .5], [1, 0]], mean [.75, .25];
    # |gateᵀ| = [[1, 0], [1, 2]] -> shares [[1, 0], [1/3, 2/3]], mean [2/3, 1/3]; times n = 2, times a
    s = cfsp_scores(down, [gate], sq)
    assert s.tolist() == pytest.approx([2 * (0.75 + 2 / 3) * 2, 2 * (0.25 + 1 / 3) * 1])


def test_cfsp_score_depends_on_the_weights_not_only_on_activations():
    torch.manual_seed(0)
    hidden, n = 16, 12
    down, up, gate = torch.randn(hidden, n), torch.randn(n, hidden), torch.randn(n, hidden)
    sq = torch.linspace(1.0, 1.3, n) ** 2  # activation norms close together
    down[:, 0] *= 20  # channel 0: large weights everywhere, smallest activation
    up[0] *= 20
    gate[0] *= 20
    ours = cfsp_scores(down, [gate, up], sq)
    act = sq.sqrt()
    assert torch.argmax(ours) == 0 and torch.argmax(act) != 0
    assert not torch.equal(top_units(ours, 6), top_units(act, 6))
    # the reference's normalisation (each column over the hidden dimension) averages every weight term to
    # 1/hidden per channel: its ranking is the activation norm's whatever the weights
    terms = [down.abs() * act, up.abs().T, gate.abs().T]
    reference = sum(t / t.sum(0, keepdim=True) for t in terms).mean(0) * act
    assert torch.allclose(reference, 3 / hidden * act) and torch.equal(top_units(reference, 6), top_units(act, 6))


@pytest.mark.parametrize("b,c", [(1.0, 1.0), (0.5, 2.0), (0.0, 0.0)])
def test_cfsp_scores_computed_in_place_equal_the_formula_bit_for_bit(b, c):
    """cfsp_scores builds one float64 term at a time, in place (a streamed run's peak); the bits are those of
    the formula written out with every term at once, zero rows and columns included."""
    g = torch.Generator().manual_seed(0)
    down, sq = torch.randn(24, 96, generator=g), torch.rand(96, generator=g) + 0.1
    ins = [torch.randn(96, 24, generator=g) for _ in range(2)]
    down[3], ins[0][:, 5] = 0, 0
    act = sq.double().sqrt()
    terms = [down.abs().double() * act[None, :] ** b] + [w.abs().double().T for w in ins]
    formula = sum(t / t.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny) for t in terms)
    assert torch.equal(cfsp_scores(down, ins, sq, b, c), formula.mean(0) * 96 * act ** c)


def test_block_ranks_follow_importance():
    assert block_ranks(8, None, 3) == [8, 8, 8]
    assert block_ranks(8, [0.5, 1.0, 1.5], 3) == [4, 8, 12]
    assert block_ranks(4, [0.01, 1.99], 2) == [1, 8]


# ---- surgery -----------------------------------------------------------------------------------

def _names(model):
    return get_adapter(model).structure_names(model)


@pytest.mark.parametrize("kv", [2, 4])  # GQA (2 query heads per KV head) and plain multi-head attention
def test_removing_units_equals_zeroing_their_output_weights(kv):
    """Removing channels / KV groups gives the logits of the dense model with their down/o columns zeroed:
    q, k, v, o and gate, up, down are cut consistently."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=kv, num_hidden_layers=2)
    names = _names(model)
    masked = copy.deepcopy(model)
    rep, hd = 4 // kv, names["head_dim"]
    chans, groups = torch.tensor([3, 10, 50, 127]), torch.tensor([1])
    for pruned, ref in zip(model.model.layers, masked.model.layers):
        keep_c = torch.tensor([i for i in range(128) if i not in chans.tolist()])
        keep_channels(pruned, names, keep_c)
        keep_groups(pruned, names, torch.tensor([g for g in range(kv) if g not in groups.tolist()]))
        ref.mlp.down_proj.weight[:, chans] = 0
        for g in groups.tolist():
            ref.self_attn.o_proj.weight[:, g * rep * hd:(g + 1) * rep * hd] = 0
        assert pruned.mlp.gate_proj.weight.shape == (124, 64) and pruned.mlp.down_proj.weight.shape == (64, 124)
        assert pruned.self_attn.q_proj.weight.shape == ((kv - 1) * rep * hd, 64)
        assert pruned.self_attn.k_proj.weight.shape == ((kv - 1) * hd, 64) == pruned.self_attn.v_proj.weight.shape
        assert pruned.self_attn.o_proj.weight.shape == (64, (kv - 1) * rep * hd)
        assert pruned.self_attn.num_key_value_groups == rep
    assert torch.allclose(_logits(model), _logits(masked), atol=1e-5)


@pytest.mark.parametrize("method", ["cfsp", "wanda-sp", "magnitude"])
def test_channels_and_groups_with_zero_weights_go_first_and_logits_stay(method, windows):
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    hd = _names(model)["head_dim"]
    with torch.no_grad():
        for layer in model.model.layers:
            dead = torch.arange(0, 128, 4)  # 32 of 128 channels carry nothing
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[:, dead] = 0
            for n in ("q_proj", "k_proj", "v_proj"):  # KV group 0 (query heads 0, 1) is dead
                w = getattr(layer.self_attn, n).weight
                w[: (2 if n == "q_proj" else 1) * hd] = 0
            layer.self_attn.o_proj.weight[:, : 2 * hd] = 0
    before = _logits(model)
    spec = _spec(method=method, ffn=0.25, heads=0.5, round_to=8, uniform=True)
    details = structure(model, get_adapter(model), windows, spec, build_structured(spec), "cpu", 4)
    assert details["intermediate_size"] == [96, 96] and details["kv_groups"] == [1, 1]
    assert torch.allclose(_logits(model), before, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_cfsp_budget_shapes_and_parameter_count(arch, windows):
    model = tiny_model(arch, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    before = sum(p.numel() for p in model.parameters())
    spec = _spec(method="cfsp", ffn=0.5, heads=0.25, round_to=8, a=5.0)
    d = structure(model, get_adapter(model), windows, spec, build_structured(spec), "cpu", 4)
    assert sum(d["ffn_keep_ratio"]) / 4 == pytest.approx(0.5) and sum(d["heads_keep_ratio"]) / 4 == pytest.approx(0.75)
    assert sum(d["intermediate_size"]) == 4 * 64 and all(w % 8 == 0 for w in d["intermediate_size"])
    assert sum(d["kv_groups"]) == 12 and len(set(d["intermediate_size"])) > 1  # per-block budgets differ
    for layer, w, g in zip(model.model.layers, d["intermediate_size"], d["kv_groups"]):
        assert layer.mlp.up_proj.weight.shape == (w, 64) and layer.mlp.down_proj.weight.shape == (64, w)
        assert layer.self_attn.k_proj.weight.shape == (g * 8, 64) and layer.self_attn.o_proj.weight.shape == (64, g * 16)
    qkv_bias = 16 + 8 + 8 if arch == "qwen2" else 0
    removed = sum((128 - w) * 3 * 64 + (4 - g) * ((16 + 8 + 8 + 16) * 64 + qkv_bias)
                  for w, g in zip(d["intermediate_size"], d["kv_groups"]))
    assert d["parameters"] == [before, before - removed] == [before, sum(p.numel() for p in model.parameters())]
    # blocks that change their input more keep more
    order = sorted(range(4), key=lambda i: d["block_distance"][i])
    assert [d["ffn_keep_ratio"][i] for i in order] == sorted(d["ffn_keep_ratio"])
    assert torch.isfinite(_logits(model)).all()


def test_opt_channels_and_heads_cut_with_their_biases(windows):
    """OPT: fc1 rows (with bias) and fc2 columns; heads (no GQA) cut in q/k/v (with bias) and out_proj, and
    the attention's num_heads updated. Removing units equals zeroing their fc2 / out_proj columns."""
    model = tiny_model("opt", num_hidden_layers=2)
    names = _names(model)
    assert names["ffn_in"] == ["fc1"] and names["kv_heads"] == names["heads"] == 4 and names["head_dim"] == 16
    masked = copy.deepcopy(model)
    chans, heads = torch.tensor([3, 10, 50, 127]), [2]
    for pruned, ref in zip(model.model.decoder.layers, masked.model.decoder.layers):
        keep_channels(pruned, names, torch.tensor([i for i in range(128) if i not in chans.tolist()]))
        keep_groups(pruned, names, torch.tensor([0, 1, 3]))
        ref.fc2.weight[:, chans] = 0
        ref.self_attn.out_proj.weight[:, 32:48] = 0
        assert pruned.fc1.weight.shape == (124, 64) and pruned.fc1.bias.shape == (124,)
        assert pruned.fc2.weight.shape == (64, 124) and pruned.fc2.bias.shape == (64,)
        assert pruned.self_attn.q_proj.bias.shape == (48,) and pruned.self_attn.out_proj.weight.shape == (64, 48)
        assert pruned.self_attn.num_heads == 3
    assert torch.allclose(_logits(model), _logits(masked), atol=1e-5)


@pytest.mark.parametrize("uniform,heads", [(True, 0.0), (False, 0.5)])
def test_opt_export_stock_or_runtime_file(uniform, heads, model_dirs, tmp_path):
    """FFN-only uniform widths are a stock OPT config (ffn_dim); fewer heads need the runtime file (OPT's
    head_dim is hidden_size / heads), and its logits and KV-cache generation match."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report = compress(_recipe({"method": "cfsp", "ffn": 0.5, "heads": heads, "uniform": uniform, "a": 5.0}), out,
                      RunOptions(), str(model_dirs["opt"]))
    cfg = json.loads((out / "config.json").read_text())
    ours = load_model(str(out)).model
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not uniform).eval()
    if uniform:
        assert cfg["model_type"] == "opt" and cfg["ffn_dim"] == 64 and "auto_map" not in cfg
    else:
        assert cfg["model_type"] == "sparsellm_sliced_opt" and report["model"]["per_layer_widths"]
        assert [layer.self_attn.num_heads for layer in plain.model.decoder.layers] == \
            report["stages"][0]["details"]["heads"]
    assert torch.equal(_logits(plain), _logits(ours))
    _assert_kv_cache_generate_matches(ours)


def test_opt_uniform_heads_is_refused_with_a_clear_error(model_dirs, tmp_path):
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["opt"]), "--structure", "wanda-sp", "--heads", "0.5",
                                 "--uniform", "--calib", str(TEXT), "-o", str(tmp_path / "o")])
    assert r.exit_code == 7 and "no head count a stock opt config accepts" in r.output and "Traceback" not in r.output


# ---- LoRA --------------------------------------------------------------------------------------

def test_lora_merge_gives_the_unmerged_logits_and_a_plain_model(windows):
    model = tiny_model("llama")
    spec = _lora_spec(steps=3, lr=1e-2, rank=4)
    peft_model, ranks = attach(model, get_adapter(model), spec, [0.5, 1.5])
    assert ranks == [2, 6]
    assert peft_model.base_model.model.model.layers[1].mlp.up_proj.lora_A["default"].weight.shape[0] == 6
    seen = []  # the tokens the model was actually given during training
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    details = train(peft_model, windows, spec, seed=0, device="cpu")
    hook.remove()
    trained = details.pop("unwrapped")
    trained.eval()
    with torch.no_grad():
        unmerged = trained(IDS).logits
    merged = merge(trained)
    assert merged is model and not any("lora" in n for n, _ in merged.named_modules())
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert torch.allclose(_logits(merged), unmerged, atol=1e-4)  # float32 rounding of W + (alpha/r)·B·A
    assert not torch.allclose(_logits(merged), _logits(tiny_model("llama")), atol=1e-3)  # training did something
    # 3 steps of batch_size 2 windows of 32 tokens, as fed to the model, and as the report says
    assert seen == [64, 64, 64] and details["steps"] == 3 and details["tokens"] == 192


# ---- recipes, export, CLI ----------------------------------------------------------------------

def _recipe(structure_stage: dict, recover: dict | None = None):
    stages = [{"structure": structure_stage}] + ([{"recover": {"method": "lora", **recover}}] if recover else [])
    return recipe_from_dict({"calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32}, "stages": stages})


@pytest.mark.parametrize("arch,uniform", [("llama", True), ("llama", False), ("qwen2", False)])
def test_export_round_trip_and_kv_cache_generate(arch, uniform, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    stage = {"method": "cfsp", "ffn": 0.5, "heads": 0.5, "uniform": uniform, "a": 5.0}
    report = compress(_recipe(stage), out, RunOptions(), str(model_dirs[arch]))
    cfg = json.loads((out / "config.json").read_text())
    ours = load_model(str(out)).model
    assert report["model"]["per_layer_widths"] == (not uniform) and report["stages"][0]["details"]["stock_architecture"] == uniform
    if uniform:
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert cfg["model_type"] == arch and cfg["intermediate_size"] == 64 and cfg["num_key_value_heads"] == 1
        assert cfg["num_attention_heads"] == 2 and cfg["head_dim"] == 16 and "auto_map" not in cfg
        assert not (out / "modeling_sliced.py").exists()
    else:
        assert cfg["model_type"] == f"sparsellm_sliced_{arch}" and "AutoModelForCausalLM" in cfg["auto_map"]
        with pytest.raises(ValueError, match="trust_remote_code|custom code"):
            AutoModelForCausalLM.from_pretrained(out)
        plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert type(plain).__module__ != type(ours).__module__
    assert report["model"]["parameters"] == sum(p.numel() for p in ours.parameters()) < report["model"]["parameters_before"]
    assert torch.equal(_logits(plain.eval()), _logits(ours))
    _assert_kv_cache_generate_matches(ours)


def test_cli_structure_with_recovery_is_bit_identical_across_runs(model_dirs, tmp_path):
    outs = []
    for n in range(2):
        out = tmp_path / f"o{n}"
        r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), "--structure", "cfsp", "--ffn", "0.5",
                                     "--round-to", "16", "--recover-steps", "2", "--calib", str(TEXT), "--nsamples", "4",
                                     "--seqlen", "32", "-o", str(out)])
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    report = json.loads((outs[0] / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["structure", "recover"]
    widths = report["stages"][0]["details"]["intermediate_size"]
    assert sum(widths) == 128 and all(w % 16 == 0 for w in widths)
    rec = report["stages"][1]["details"]
    assert rec["steps"] == 2 and len(rec["ranks"]) == 2 and rec["seconds"] > 0
    m = load_model(str(outs[0])).model
    assert [layer.mlp.up_proj.out_features for layer in m.model.layers] == widths


@pytest.mark.parametrize("stages,needle", [
    ([{"structure": {"method": "cfsp", "ffn": 1.0}}], "ffn: Input should be less than 1"),
    ([{"structure": {"method": "cfsp", "ffn": 0.2, "round_to": 0}}], "round_to: Input should be greater than 0"),
    ([{"structure": {"method": "wanda-sp"}}], "nothing to remove"),
    ([{"structure": {"method": "cfsp", "ffn": 0.2, "heads": -0.1}}], "heads: Input should be greater than or equal to 0"),
    ([{"recover": {"method": "lora"}}], "put a structure (or slice) stage before it"),
    ([{"structure": {"method": "cfsp", "ffn": 0.2}}, {"prune": {"method": "wanda", "sparsity": 0.5}},
      {"recover": {"method": "lora"}}], "cannot follow a prune stage"),
    ([{"structure": {"method": "flap", "ffn": 0.2}}], "does not match any of the expected tags: 'cfsp', 'wanda-sp', 'magnitude'"),
])
def test_invalid_structure_recipes_exit_2(stages, needle, model_dirs, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"calibration": {"dataset": str(TEXT)}, "stages": stages}))
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), "--recipe", str(recipe), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_round_to_wider_than_the_ffn_exits_7(model_dirs, tmp_path):
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), "--structure", "magnitude", "--ffn", "0.2",
                                 "--round-to", "256", "--calib", str(TEXT), "-o", str(tmp_path / "o")])
    assert r.exit_code == 7 and "round_to 256 exceeds the width 128" in r.output
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), "--ffn", "0.2", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "need --structure" in r.output


def test_baselines_keep_one_width_everywhere_and_export_stock(windows):
    model = tiny_model("qwen2", num_hidden_layers=3)
    spec = _spec(method="wanda-sp", ffn=0.2, round_to=8)  # 102.4 channels: 104 in every layer, not a 96/104 mix
    d = structure(model, get_adapter(model), windows, spec, build_structured(spec), "cpu", 4)
    assert d["intermediate_size"] == [104, 104, 104] and d["stock_architecture"]
    assert model.config.intermediate_size == 104 and getattr(model.config, "sparsellm_structure", None) is None
