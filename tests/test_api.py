"""sparsellm.oneshot: the Python API over the same pipeline as the CLI."""
import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsellm
from conftest import TEXT
from sparsellm.cli import cli
from sparsellm.errors import RecipeError

RECIPE = {"calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32, "batch_size": 4},
          "evaluation": {"ppl": [str(TEXT)], "seqlen": 32, "limit": 2},
          "stages": [{"allocate": {"method": "owl"}}, {"prune": {"method": "wanda", "sparsity": 0.5}},
                     {"refine": {"method": "dsnot"}}]}


def test_oneshot_on_a_model_object_equals_the_cli_output(model_dirs, tmp_path):
    folder = model_dirs["llama"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    r = CliRunner().invoke(cli, ["prune", "--model", str(folder), "--recipe", str(tmp_path / "r.yaml"),
                                 "--device", "cpu", "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(folder)
    out = sparsellm.oneshot(model, RECIPE, output_dir=tmp_path / "api", device="cpu",
                            tokenizer=AutoTokenizer.from_pretrained(folder))
    assert out is model  # compressed in place and returned
    for f in ("model.safetensors", "config.json", "recipe.yaml", "tokenizer.json"):
        assert (tmp_path / "api" / f).read_bytes() == (tmp_path / "cli" / f).read_bytes(), f
    down = model.model.layers[0].mlp.down_proj.weight
    assert 0.3 < float((down == 0).float().mean()) < 0.7  # OWL's per-layer sparsity around the 50 % target


def test_oneshot_in_memory_with_a_path_a_yaml_recipe_and_a_dataset(model_dirs, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"stages": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}],
                                                     "calibration": {"nsamples": 2, "seqlen": 32}}))
    model = sparsellm.oneshot(str(model_dirs["qwen2"]), tmp_path / "r.yaml", dataset=str(TEXT), device="cpu")
    w = model.model.layers[1].self_attn.o_proj.weight
    assert torch.equal((w.reshape(-1, 4) == 0).sum(1), torch.full((w.numel() // 4,), 2))  # exact 2:4
    assert not any(tmp_path.glob("*/")), "nothing written without output_dir"


def test_oneshot_refuses_unknown_options_and_recipe_types(model_dirs):
    with pytest.raises(RecipeError, match="unknown option 'devcie'"):
        sparsellm.oneshot(str(model_dirs["llama"]), RECIPE, devcie="cpu")
    with pytest.raises(RecipeError, match="recipe must be a recipe object, a dict or a YAML path"):
        sparsellm.oneshot(str(model_dirs["llama"]), 42)
