"""Extending is local: a new method is a spec, a class and one `register` call, here in the test file
alone; it runs through a YAML recipe and the CLI like the built-in ones."""
from typing import Literal

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import sparsellm.stage as stage
from conftest import TEXT
from sparsellm.cli import cli
from sparsellm.compress.base import PruneMethod, PruneSpec, Target


class FirstColumnsPrune(PruneSpec):
    """Toy method: zero the first ⌊sparsity·columns⌋ input columns of every matrix (needs no data)."""
    method: Literal["first-columns"]


class FirstColumns(PruneMethod):
    @torch.no_grad()
    def compress(self, t: Target) -> None:
        k = int(self.sparsity_at(t.layer) * t.linear.in_features)
        t.linear.weight[:, :k] = 0


@pytest.fixture
def toy(monkeypatch):
    stage.load_builtin()  # every built-in method in the registry that comes back (none registers into the copy)
    monkeypatch.setattr(stage, "_methods", {k: dict(v) for k, v in stage._methods.items()})
    stage.register("prune", FirstColumnsPrune, FirstColumns)
    yield
    stage.version += 1  # the built-in registry comes back: the recipe schema is rebuilt without the toy


def check_output(out):
    weights = load_file(out / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert torch.count_nonzero(q[:, :32]) == 0 and bool((q[:, 32:] != 0).all())  # hidden 64: columns 0..31
    assert "model.embed_tokens.weight" in weights and bool((weights["model.embed_tokens.weight"] != 0).all())


def test_a_method_registered_from_a_test_file_runs_from_yaml_and_the_cli(toy, model_dirs, tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"evaluation": {"ppl": [str(TEXT)], "seqlen": 32, "limit": 2},
                                      "stages": [{"prune": {"method": "first-columns", "sparsity": 0.5}}]}))
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), "--recipe", str(recipe),
                                 "-o", str(tmp_path / "yaml")])
    assert r.exit_code == 0, r.output
    check_output(tmp_path / "yaml")
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), "--method", "first-columns",
                                 "--sparsity", "0.5", "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    check_output(tmp_path / "cli")
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (tmp_path / "yaml" / "model.safetensors").read_bytes()
    report = yaml.safe_load((tmp_path / "yaml" / "report.json").read_text())
    assert [(s["kind"], s["method"]) for s in report["stages"]] == [("prune", "first-columns")]
    assert report["sparsity"]["overall"] == pytest.approx(0.5)


def test_without_the_registration_the_method_is_an_unknown_choice(model_dirs, tmp_path):
    r = CliRunner().invoke(cli, ["prune", "--model", str(model_dirs["llama"]), "--method", "first-columns",
                                 "--sparsity", "0.5", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "'first-columns' is not one of" in r.output
