"""Layer-wise allocation: hand-computed OWL and ECoFLaP budgets, exact overall targets, end to end."""
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import TEXT, tiny_model
from sparsellm.allocate import fit_mean, realized, round_nm
from sparsellm.allocate.base import owl_sparsities, water_fill
from sparsellm.allocate.ecoflap import layer_importance
from sparsellm.allocate.owl import OutlierRatios
from sparsellm.calibrate import make_selector, run_layerwise
from sparsellm.cli import cli
from sparsellm.compress.base import Target
from sparsellm.loading import get_adapter
from sparsellm.recipe import recipe_from_dict

LLAMA_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def test_owl_hand_case():
    # ratios 1, 2, 3 -> normalized 0, 0.5, 1 -> sparsity target - 2*lam*[0, .5, 1]
    assert owl_sparsities([1.0, 2.0, 3.0], 0.5, 0.1) == pytest.approx([0.5, 0.4, 0.3])
    sizes = [[(100, 100)]] * 3
    assert fit_mean([0.5, 0.4, 0.3], sizes, 0.5) == pytest.approx([0.6, 0.5, 0.4], abs=1e-6)
    assert owl_sparsities([2.0, 2.0], 0.7, 0.08) == [0.7, 0.7]


def test_outlier_ratio_hand_case():
    probe = OutlierRatios(M=2.0)
    lin = torch.nn.Linear(4, 1, bias=False)
    lin.weight.data = torch.tensor([[1.0, 1.0, 1.0, 9.0]])

    class S:
        sq_norm = torch.ones(4)

    probe.compress(Target("x", 0, lin, S()))
    probe.finish_layer(0)
    assert probe.ratios[0] == 0.25  # mean score 3; only 9 > 2 * 3


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
def test_fit_mean_meets_target_within_a_tenth_of_a_percent(target):
    torch.manual_seed(0)
    sizes = [LLAMA_LAYER] * 30
    raw = (target + 0.08 * (torch.rand(30) * 2 - 1)).tolist()
    s = fit_mean(raw, sizes, target)
    assert abs(realized(s, sizes) - target) < 1e-3
    # the shape of the allocation is kept: one constant shift
    shifts = [a - b for a, b in zip(s, raw)]
    assert max(shifts) - min(shifts) < 1e-9


def test_fit_mean_clips_and_still_meets_target():
    sizes = [[(64, 64)]] * 4
    s = fit_mean([0.1, 0.5, 0.9, 0.99], sizes, 0.6, lo=0.2, hi=0.8)
    assert min(s) >= 0.2 and max(s) <= 0.8
    assert abs(realized(s, sizes) - 0.6) < 1 / 64


def test_round_nm_keeps_the_mean():
    sizes = [[(8, 16)]] * 6
    s = round_nm([0.42, 0.46, 0.5, 0.52, 0.55, 0.58], sizes, 0.5, 4)
    assert all(x * 4 == int(x * 4) for x in s)
    assert sum(s) / 6 == pytest.approx(0.5)
    # a wide allocation gives mixed N:4 layers
    s = round_nm([0.3, 0.4, 0.5, 0.6, 0.7, 0.5], sizes, 0.5, 4)
    assert sorted(set(s)) == [0.25, 0.5, 0.75] and sum(s) / 6 == pytest.approx(0.5)


def test_water_fill_hand_case():
    # keep budget 0.5 * 300 = 150; floors keep 0.2 * 100 each = 60, the other 90 split 1:2:3
    s = water_fill([1.0, 2.0, 3.0], [100, 100, 100], 0.5, 0.8)
    assert [1 - x for x in s] == pytest.approx([0.35, 0.5, 0.65])
    # a layer that would exceed its size is capped and the rest goes to the others
    s = water_fill([1.0, 1.0, 10.0], [100, 100, 100], 0.5, 0.9)
    keep = [100 * (1 - x) for x in s]
    assert keep[2] == pytest.approx(100) and sum(keep) == pytest.approx(150)
    assert max(s) <= 0.9 + 1e-9


def test_layer_importance_is_deterministic_and_restores_weights(windows):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model)
    a = layer_importance(model, adapter, windows[:4], make_selector([], []), "cpu", 2, num_noise=2, eps=1e-3, seed=0)
    b = layer_importance(model, adapter, windows[:4], make_selector([], []), "cpu", 2, num_noise=2, eps=1e-3, seed=0)
    assert a == b and len(a) == 2 and all(x > 0 for x in a)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_owl_statistics_pass_changes_nothing(windows):
    model = tiny_model("opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = OutlierRatios(M=3.0)
    run_layerwise(model, get_adapter(model), windows, [probe], make_selector([], []), batch_size=4)
    assert set(probe.ratios) == {0, 1} and all(0 < r < 0.2 for r in probe.ratios.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _prune(tmp_path, model_dirs, stages, arch="llama"):
    data = {"seed": 0, "calibration": {"dataset": str(TEXT), "nsamples": 6, "seqlen": 32, "batch_size": 4},
            "evaluation": {"ppl": [str(TEXT)], "seqlen": 32, "limit": 2, "before": False}, "stages": stages}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs[arch]), "--recipe", str(tmp_path / "r.yaml"), "--output", str(out)])
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("method", ["owl", "ecoflap"])
def test_allocation_end_to_end(method, model_dirs, tmp_path):
    alloc = {"method": method, "lambda": 0.1} if method == "owl" else {"method": method, "nsamples": 2}
    out, rep = _prune(tmp_path, model_dirs, [{"allocate": alloc}, {"prune": {"method": "wanda", "sparsity": 0.6}},
                                             {"refine": {"method": "dsnot"}}])
    a = rep["allocation"]
    achieved = [p["sparsity"] for p in rep["sparsity"]["per_layer"]]
    assert a["method"] == method and len(a["sparsity"]) == 2 and a["sparsity"][0] != a["sparsity"][1]
    # tiny layers (64 inputs) realize sparsity in steps of 1/64 per row
    assert abs(rep["sparsity"]["overall"] - 0.6) < 1 / 64
    assert achieved == pytest.approx(a["sparsity"], abs=1 / 64)
    md = (out / "report.md").read_text()
    assert "allocation" in md and "sparsity_per_layer.png" in md
    png = (out / "sparsity_per_layer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s["kind"] for s in rep["stages"]] == ["allocate", "prune", "refine"]


def test_allocation_with_nm_gives_mixed_n(model_dirs, tmp_path):
    _, rep = _prune(tmp_path, model_dirs, [{"allocate": {"method": "owl", "lambda": 0.25}},
                                           {"prune": {"method": "wanda", "pattern": "2:4"}}])
    s = rep["allocation"]["sparsity"]
    assert sorted(s) == [0.25, 0.75]
    assert rep["sparsity"]["overall"] == pytest.approx(0.5)


@pytest.mark.parametrize("stages,msg", [
    ([{"refine": {"method": "dsnot"}}], "must come right after a prune"),
    ([{"allocate": {"method": "owl"}}], "must be followed by a prune"),
    ([{"allocate": {"method": "owl"}}, {"refine": {"method": "dsnot"}}], "must be followed by a prune"),
    ([{"allocate": {"method": "owl", "sparsity": 0.5}}, {"prune": {"method": "wanda", "sparsity": 0.6}}], "differs"),
    ([{"allocate": {"method": "owl", "max_sparsity": 0.5}}, {"prune": {"method": "wanda", "sparsity": 0.6}}], "outside"),
    ([{"prune": {"method": "wanda", "sparsity": 0.6}}, {"refine": {"method": "dsnot", "max_cycles": 0}}], "max_cycles"),
    ([{"allocate": {"method": "owl", "lambda": -1}}, {"prune": {"method": "wanda", "sparsity": 0.6}}], "lambda"),
])
def test_stage_order_and_ranges_are_validated(stages, msg):
    from sparsellm.errors import RecipeError
    with pytest.raises(RecipeError, match=msg):
        recipe_from_dict({"stages": stages})
