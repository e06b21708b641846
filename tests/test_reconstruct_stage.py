"""The reconstruct stage on tiny random models: masks and exact sparsity unchanged, block output error
lowered, bit-identical reruns, the YAML recipe and the CLI, the memory modes (whole, --low-memory, --device-map), the order rules."""
import json
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import TEXT, tiny_model
from test_lowmem import tensors as weights  # every tensor of an output folder (one file, or a shard per layer)
from sparsellm.cli import cli
from sparsellm.pipeline import RunOptions, run_recipe
from sparsellm.recipe import recipe_from_dict

CAL = {"dataset": str(TEXT), "nsamples": 8, "seqlen": 32, "batch_size": 4}
REC = {"method": "blockwise", "lr": 0.05, "epochs": 3, "batch_size": 2, "holdout": 0.25}


@pytest.fixture(scope="module")
def model3(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("model3")
    tiny_model("llama", num_hidden_layers=3).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def recipe(prune: dict, **rec):
    return recipe_from_dict({"seed": 0, "calibration": CAL, "evaluation": {"ppl": [], "before": False},
                             "stages": [{"prune": prune}, {"reconstruct": {**REC, **rec}}]})


def linears(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".layers." in k and k.endswith("proj.weight")}


@pytest.fixture(scope="module")
def pruned_only(model3, tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "out"
    r = recipe_from_dict({"seed": 0, "calibration": CAL, "evaluation": {"ppl": [], "before": False},
                          "stages": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}]})
    run_recipe(r, out, RunOptions(), str(model3))
    return weights(out)


@pytest.mark.parametrize("parts,target", [("block", "dense"), ("block", "same-input"), ("attention-mlp", "dense"),
                                          ("attention-mlp", "same-input")])
def test_masks_exact_and_error_lower(parts, target, model3, pruned_only, tmp_path):
    out = tmp_path / "out"
    report = run_recipe(recipe({"method": "sparsegpt", "pattern": "2:4"}, parts=parts, target=target), out,
                        RunOptions(), str(model3))
    after = weights(out)
    changed = 0
    for name, w in linears(pruned_only).items():
        # the same zeros, exactly: nothing pruned came back, nothing kept was pruned
        assert torch.equal(after[name] == 0, w == 0), name
        groups = (after[name] != 0).reshape(-1, 4).sum(1)
        assert int(groups.max()) <= 2, name  # still 2:4
        changed += int(not torch.equal(after[name], w))
    assert changed == len(linears(pruned_only))  # every Linear's kept weights were trained
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    blocks = report["stages"][1]["details"]["blocks"]
    assert [b["layer"] for b in blocks] == [0, 1, 2]
    names = ["block"] if parts == "block" else ["attention", "mlp"]
    for b in blocks:
        for n in names:
            assert b[n]["heldout_after"] < b[n]["heldout_before"], (b["layer"], n, b[n])
            assert b[n]["train_after"] < b[n]["train_before"], (b["layer"], n, b[n])
            assert b[n]["best_epoch"] >= 1


def test_block_output_error_against_the_dense_model_is_lower(model3, tmp_path):
    """Measured outside the stage: the last block's outputs on the calibration windows come closer to
    the dense model's after reconstruction (target dense: the whole stack so far, not one block)."""
    from sparsellm.data import calibration_windows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model3)
    ids = calibration_windows(tok, str(TEXT), 8, 32, 0)

    def hidden(folder):
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return m(input_ids=ids, output_hidden_states=True).hidden_states[-2]  # the last block's output, before the norm

    dense = hidden(model3)
    errs = {}
    for name, stages in (("pruned", [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}]),
                         ("rec", [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}, {"reconstruct": REC}])):
        r = recipe_from_dict({"seed": 0, "calibration": CAL, "evaluation": {"ppl": [], "before": False}, "stages": stages})
        run_recipe(r, tmp_path / name, RunOptions(), str(model3))
        errs[name] = float(((hidden(tmp_path / name) - dense) ** 2).mean())
    assert errs["rec"] < 0.97 * errs["pruned"], errs


def test_bit_identical_reruns(model3, tmp_path):
    torch.set_num_threads(1)
    for n in (1, 2):
        run_recipe(recipe({"method": "wanda", "sparsity": 0.5}), tmp_path / f"o{n}", RunOptions(), str(model3))
    a, b = weights(tmp_path / "o1"), weights(tmp_path / "o2")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_yaml_recipe_through_the_cli_and_low_memory(model3, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"seed": 0, "calibration": CAL, "evaluation": {"ppl": [str(TEXT)], "seqlen": 32, "limit": 2},
                                    "stages": [{"prune": {"method": "wanda", "pattern": "2:4"}}, {"reconstruct": REC}]}))
    runs = {}
    for mode, extra in (("memory", []), ("stream", ["--low-memory"])):
        out = tmp_path / mode
        r = CliRunner().invoke(cli, ["prune", "--model", str(model3), "--recipe", str(path), "--output", str(out), *extra])
        assert r.exit_code == 0, r.output
        runs[mode] = (json.loads((out / "report.json").read_text()), weights(out))
    rep, w = runs["memory"]
    assert [s["kind"] for s in rep["stages"]] == ["prune", "reconstruct"]
    assert rep["stages"][1]["details"]["dense_copy_bytes"] > 0
    assert rep["perplexity"]["after"][str(TEXT)] > 0
    low, lw = runs["stream"]
    assert low["low_memory"]["reason"] == "requested (--low-memory)"
    assert low["stages"][1]["details"]["dense_copy_bytes"] == 0  # the dense layers were re-read from the shards
    assert low["stages"][1]["details"]["blocks"] == rep["stages"][1]["details"]["blocks"]
    for k in linears(w):
        assert torch.equal(lw[k], w[k]), k


def test_device_map_through_the_cli_gives_the_in_memory_bytes(model3, tmp_path):
    """--device-map with layers offloaded to disk: the dense layers come from a scratch copy in the offload
    folder, deleted afterwards; the output equals the in-memory run's."""
    from test_lowmem import offload_map

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"seed": 0, "calibration": CAL, "stages": [{"prune": {"method": "wanda", "sparsity": 0.5}},
                                                                              {"reconstruct": REC}]}))
    runs = {}
    for mode, extra in (("memory", []), ("offloaded", ["--device-map", json.dumps(offload_map(model3)),
                                                       "--offload-folder", str(tmp_path / "offload")])):
        r = CliRunner().invoke(cli, ["prune", "--model", str(model3), "--recipe", str(path), "--output",
                                     str(tmp_path / mode), *extra])
        assert r.exit_code == 0, r.output
        runs[mode] = json.loads((tmp_path / mode / "report.json").read_text())
    assert runs["offloaded"]["stages"][1]["details"]["dense_copy_bytes"] == 0
    assert runs["offloaded"]["stages"][1]["details"]["blocks"] == runs["memory"]["stages"][1]["details"]["blocks"]
    a, b = weights(tmp_path / "memory"), weights(tmp_path / "offloaded")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "offload").glob("sparsellm-dense-*"))


@pytest.mark.parametrize("stages,problem", [
    ([{"reconstruct": {"method": "blockwise"}}], "put a prune (or learn) stage before it"),
    ([{"slice": {"method": "slicegpt", "slicing": 0.2}}, {"prune": {"method": "wanda", "sparsity": 0.5}},
      {"reconstruct": {"method": "blockwise"}}], "reconstruct without them"),
    ([{"prune": {"method": "wanda", "sparsity": 0.5}}, {"reconstruct": {"method": "blockwise", "holdout": 1.0}}],
     "stages.1.reconstruct.blockwise.holdout"),
])
def test_recipe_problems(stages, problem):
    from sparsellm.errors import RecipeError

    with pytest.raises(RecipeError, match=re.escape(problem)):
        recipe_from_dict({"stages": stages})


def test_batch_size_must_divide_the_windows(model3, tmp_path):
    from sparsellm.errors import RecipeError

    r = recipe_from_dict({"calibration": {**CAL, "nsamples": 3}, "evaluation": {"ppl": []},
                          "stages": [{"prune": {"method": "wanda", "sparsity": 0.5}},
                                     {"reconstruct": {"method": "blockwise", "batch_size": 2}}]})
    with pytest.raises(RecipeError, match="use a batch_size that divides calibration.nsamples"):
        run_recipe(r, tmp_path / "o", RunOptions(), str(model3))
    assert not (tmp_path / "o").exists()
