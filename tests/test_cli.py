"""End-to-end `sparsellm prune` / `eval` on tiny model folders, through the CLI in-process."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from conftest import TEXT
from sparsellm.cli import cli
from sparsellm.recipe import load_recipe


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def write_recipe(path: Path, stages, **top):
    data = {"seed": 0, "calibration": {"dataset": str(TEXT), "nsamples": 6, "seqlen": 32, "batch_size": 4},
            "evaluation": {"ppl": [str(TEXT)], "seqlen": 32, "limit": 4}, "stages": stages, **top}
    path.write_text(yaml.safe_dump(data))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_prune_with_recipe_writes_complete_folder(arch, model_dirs, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}])
    out = tmp_path / "out"
    r = run("prune", "--model", model_dirs[arch], "--recipe", recipe, "--output", out)
    assert r.exit_code == 0, r.output
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "report.json", "report.md"} <= names
    assert not list(tmp_path.glob(".out.partial-*"))

    model = AutoModelForCausalLM.from_pretrained(out)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            assert ((mod.weight == 0).view(mod.out_features, -1, 4).sum(-1) == 2).all(), name

    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["overall"] == pytest.approx(0.5)
    assert len(report["sparsity"]["per_layer"]) == 2
    assert report["stages"][0]["method"] == "sparsegpt" and report["stages"][0]["seconds"] > 0
    assert report["stages"][0]["peak_rss_bytes"] > 0
    before, after = report["perplexity"]["before"][str(TEXT)], report["perplexity"]["after"][str(TEXT)]
    assert 1 < before < 1e6 and 1 < after < 1e6 and before != after
    assert set(report["versions"]) == {"sparsellm", "torch", "transformers", "python"}
    assert {"load", "calibration data", "export"} <= set(report["timings"])
    assert "| sparsegpt |" in (out / "report.md").read_text()
    # the resolved recipe written next to the model is itself a valid recipe
    assert load_recipe(out / "recipe.yaml").stages[0].prune.sparsity == 0.5


def test_bit_identical_reruns(model_dirs, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", [{"prune": {"method": "wanda", "sparsity": 0.6}}])
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run("prune", "--model", model_dirs["qwen2"], "--recipe", recipe, "--output", out).exit_code == 0
    assert sha(outs[0] / "model.safetensors") == sha(outs[1] / "model.safetensors")
    assert sha(outs[0] / "config.json") == sha(outs[1] / "config.json")


def test_prune_without_yaml_and_cli_overrides(model_dirs, tmp_path):
    out = tmp_path / "o"
    r = run("prune", "--model", model_dirs["mistral"], "--method", "wanda", "--sparsity", "0.5", "--pattern", "4:8",
            "--calib", TEXT, "--nsamples", 4, "--seqlen", 16, "--seed", 3, "--output", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"] == {"dataset": str(TEXT), "nsamples": 4, "seqlen": 16, "seed": 3, "tokens": 64}
    assert report["recipe"]["stages"][0]["prune"]["pattern"] == "4:8"
    assert report["perplexity"] is None


def test_overwrite_replaces_and_refuses_without_flag(model_dirs, tmp_path):
    out = tmp_path / "o"
    args = ["prune", "--model", model_dirs["llama"], "--method", "magnitude", "--sparsity", "0.3", "--output", out,
            "--calib", TEXT, "--nsamples", 2, "--seqlen", 16]
    assert run(*args).exit_code == 0
    r = run(*args)
    assert r.exit_code == 6 and "already exists" in r.output and "--overwrite" in r.output
    assert run(*args, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_eval_command_json(model_dirs):
    r = run("eval", "--model", model_dirs["llama"], "--ppl", TEXT, "--seqlen", 32, "--limit", 3, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["seqlen"] == 32 and 1 < res["perplexity"][str(TEXT)] < 1e6


def _one_error_line(r, code, *needles):
    assert r.exit_code == code, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("stage,needles", [
    ({"method": "wanda", "sparsity": 1.0}, ["stages.0.prune.wanda.sparsity", "less than 1"]),
    ({"method": "wanda", "sparsity": -0.1}, ["sparsity", "greater than or equal to 0"]),
    ({"method": "wanda", "pattern": "4:2"}, ["pattern", "0 < N < M"]),
    ({"method": "wanda", "pattern": "2-4"}, ["pattern", "N:M"]),
    ({"method": "wanda", "sparsity": 0.5, "colour": 1}, ["stages.0.prune.wanda.colour", "unknown key"]),
    ({"method": "wanda", "sparsity": "half"}, ["sparsity", "valid number"]),
    ({"method": "obs", "sparsity": 0.5}, ["stages.0.prune", "obs"]),
    ({"method": "wanda"}, ["sparsity is required"]),
    ({"method": "wanda", "sparsity": 0.3, "pattern": "2:4"}, ["contradicts pattern 2:4"]),
])
def test_invalid_recipes_exit_2(stage, needles, model_dirs, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", [{"prune": stage}])
    r = run("prune", "--model", model_dirs["llama"], "--recipe", recipe, "--output", tmp_path / "o")
    _one_error_line(r, 2, *needles)
    assert not (tmp_path / "o").exists()


def test_recipe_errors_unknown_top_key_missing_file_and_yaml_syntax(model_dirs, tmp_path):
    bad = write_recipe(tmp_path / "a.yaml", [{"prune": {"method": "wanda", "sparsity": 0.5}}], extra=1)
    _one_error_line(run("prune", "--recipe", bad, "--output", tmp_path / "o"), 2, "extra", "unknown key")
    data = yaml.safe_load(bad.read_text())
    data.pop("extra")
    data["calibration"]["dataset"] = str(tmp_path / "nope.txt")
    bad.write_text(yaml.safe_dump(data))
    _one_error_line(run("prune", "--recipe", bad, "--output", tmp_path / "o"), 2, "calibration.dataset", "no such file")
    (tmp_path / "s.yaml").write_text("stages:\n  - prune: {method: wanda\n")
    _one_error_line(run("prune", "--recipe", tmp_path / "s.yaml", "--output", tmp_path / "o"), 2, "not valid YAML", "line")
    _one_error_line(run("prune", "--recipe", tmp_path / "missing.yaml", "--output", tmp_path / "o"), 2, "recipe file not found")


def test_nm_not_dividing_width_is_rejected_before_work(model_dirs, tmp_path):
    r = run("prune", "--model", model_dirs["llama"], "--method", "wanda", "--pattern", "3:7", "--calib", TEXT,
            "--nsamples", 2, "--seqlen", 16, "--output", tmp_path / "o")
    _one_error_line(r, 2, "M=7 does not divide", "model.layers.0.self_attn.q_proj")


def test_missing_model_and_unsupported_architecture(tmp_path, tokenizer):
    r = run("prune", "--model", tmp_path / "nothing", "--method", "magnitude", "--sparsity", "0.5", "--output", tmp_path / "o")
    _one_error_line(r, 3, "model path not found")
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    r = run("prune", "--model", d, "--method", "magnitude", "--sparsity", "0.5", "--output", tmp_path / "o")
    _one_error_line(r, 4, "unsupported architecture 'gpt2'", "llama, mistral, qwen2, opt")
    assert not (tmp_path / "o").exists()


def test_cuda_requested_without_cuda(model_dirs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    r = run("prune", "--model", model_dirs["llama"], "--method", "magnitude", "--sparsity", "0.5",
            "--device", "cuda", "--output", tmp_path / "o")
    _one_error_line(r, 2, "CUDA is not available")


def test_help_teaches():
    r = run("prune", "--help")
    assert r.exit_code == 0
    for needle in ("--recipe", "--pattern", "2:4", "wikitext2", "--overwrite"):
        assert needle in r.output


@pytest.mark.parametrize("failure,code", [(KeyboardInterrupt, 130), (OSError(28, "No space left on device"), 6)])
def test_interrupt_or_disk_full_during_export_leaves_nothing(failure, code, model_dirs, tmp_path, monkeypatch):
    import sparsellm.pipeline as pipeline

    def broken_save(model, tokenizer, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise failure

    monkeypatch.setattr(pipeline, "save_model", broken_save)
    r = run("prune", "--model", model_dirs["llama"], "--method", "magnitude", "--sparsity", "0.5", "--calib", TEXT,
            "--nsamples", 2, "--seqlen", 16, "--output", tmp_path / "o")
    assert r.exit_code == code, r.output
    assert list(tmp_path.iterdir()) == []


def test_output_parents_created_and_unwritable_rejected(model_dirs, tmp_path):
    args = ["prune", "--model", model_dirs["llama"], "--method", "magnitude", "--sparsity", "0.5"]
    out = tmp_path / "runs" / "a" / "o"
    assert run(*args, "--output", out).exit_code == 0
    assert (out / "model.safetensors").is_file()
    (tmp_path / "f").write_text("x")
    _one_error_line(run(*args, "--output", tmp_path / "f"), 6, "is a file")
    _one_error_line(run(*args, "--output", tmp_path / "f" / "o"), 6, "is a file")
    import os
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _one_error_line(run(*args, "--output", ro / "o"), 6, "not writable")


def test_data_free_recipe_needs_no_calibration_text(model_dirs, tmp_path):
    # magnitude needs no activations: the default wikitext2 (unreachable offline) must not be fetched
    out = tmp_path / "o"
    r = run("prune", "--model", model_dirs["opt"], "--recipe", "recipes/magnitude-50.yaml", "--output", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"] is None and report["sparsity"]["overall"] == pytest.approx(0.5)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    from sparsellm.recipe import recipe_from_dict

    data = yaml.safe_load(path.read_text())
    # local data files (demo.yaml's) are fetched by scripts/get_demo_data.sh, not part of a clean clone
    for section in ("calibration", "evaluation"):
        sec = data.get(section) or {}
        if isinstance(sec.get("dataset"), str) and sec["dataset"] not in ("wikitext2", "c4") and not Path(sec["dataset"]).exists():
            sec["dataset"] = str(TEXT)
        if "ppl" in sec:
            sec["ppl"] = [p if p in ("wikitext2", "c4") or Path(p).exists() else str(TEXT) for p in sec["ppl"]]
    assert recipe_from_dict(data, str(path)).stages


def test_allocate_and_refine_from_the_command_line(model_dirs, tmp_path):
    out = tmp_path / "out"
    r = run("prune", "--model", model_dirs["llama"], "--allocate", "owl", "--method", "wanda", "--sparsity", "0.6",
            "--refine", "dsnot", "--calib", TEXT, "--nsamples", 4, "--seqlen", 32, "--output", out)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert [s["kind"] for s in rep["stages"]] == ["allocate", "prune", "refine"]
    assert len(rep["allocation"]["sparsity"]) == 2
    r = run("prune", "--model", model_dirs["llama"], "--refine", "dsnot", "--output", tmp_path / "o2")
    assert r.exit_code == 2 and "need --method" in r.output
