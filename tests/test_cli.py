"""End-to-end `sparsellm prune` / `eval` on tiny model folders, through the CLI in-process."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from conftest import TEXT, independent_perplexity
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
    # the report's numbers are those of a computation without sparsellm (transformers' loss, same chunks)
    seqlen, limit = report["perplexity"]["seqlen"], report["perplexity"]["limit"]
    assert (seqlen, limit, report["perplexity"]["chunks"]) == (32, 4, {str(TEXT): 4})
    assert before == pytest.approx(independent_perplexity(model_dirs[arch], TEXT, seqlen, limit), rel=1e-6)
    assert after == pytest.approx(independent_perplexity(out, TEXT, seqlen, limit), rel=1e-6)
    assert after > before
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
    assert res["seqlen"] == 32
    assert res["perplexity"][str(TEXT)] == pytest.approx(independent_perplexity(model_dirs["llama"], TEXT, 32, limit=3), rel=1e-6)


def test_help_teaches():
    r = run("prune", "--help")
    assert r.exit_code == 0
    for needle in ("--recipe", "--pattern", "2:4", "wikitext2", "--overwrite"):
        assert needle in r.output


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_help_examples_stay_one_per_line(command):
    # click re-wraps a paragraph unless it follows a \b line: every example command of a docstring must
    # come out as a line of its own, not run together with its neighbours
    doc = cli.commands[command].help or ""
    examples = [line.strip() for line in doc.splitlines() if line.strip().startswith("sparsellm ")]
    shown = [line.strip() for line in run(command, "--help").output.splitlines()]
    assert all(example in shown for example in examples), [e for e in examples if e not in shown]


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


def test_output_parents_are_created(model_dirs, tmp_path):
    out = tmp_path / "runs" / "a" / "o"
    assert run("prune", "--model", model_dirs["llama"], "--method", "magnitude", "--sparsity", "0.5", "--output", out).exit_code == 0
    assert (out / "model.safetensors").is_file()


def test_allow_pickle_loads_a_trusted_pickle_checkpoint(model_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file

    d = Path(shutil.copytree(model_dirs["llama"], tmp_path / "m"))
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    args = ["prune", "--model", d, "--method", "magnitude", "--sparsity", "0.5", "--output", tmp_path / "o"]
    assert run(*args).exit_code == 3  # refused by default (the message: tests/test_bad_inputs.py)
    r = run(*args, "--allow-pickle")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "model.safetensors").is_file()  # and what it writes is safetensors


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(model_dirs, tmp_path, monkeypatch, caplog):
    import sparsellm.measure as measure

    def bug(*a, **k):
        raise RuntimeError("something nobody planned for")

    monkeypatch.setattr(measure, "sparsity_summary", bug)
    args = ["prune", "--model", model_dirs["llama"], "--method", "magnitude", "--sparsity", "0.5", "--output", tmp_path / "o"]
    r = run(*args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert [line for line in r.output.splitlines() if line.startswith("error:")] == [
        "error: unexpected RuntimeError: something nobody planned for; run again with sparsellm --debug ... for the "
        "traceback, and report it"]
    assert "Traceback" not in caplog.text
    r = run("--debug", *args)  # the traceback goes to the log (stderr outside the test runner)
    assert r.exit_code == 1 and "Traceback" in caplog.text and "something nobody planned for" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_exit_codes_documented_in_help_and_readme():
    import re

    from sparsellm import errors
    from sparsellm.cli import EXIT_CODES

    codes = {c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SparseLLMError)}
    codes |= {0, errors.EXIT_INTERRUPTED}
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = set(map(int, re.findall(r"^\| (\d+) \|", readme.split("### Exit codes")[1], re.M)))
    assert table == codes
    assert set(map(int, re.findall(r"(\d+) [a-zA-Z]", EXIT_CODES.split("Exit codes:")[1]))) == codes


def test_device_defaults_to_the_gpu_when_there_is_one(monkeypatch):
    from sparsellm.pipeline import resolve_device

    for name in ("prune", "eval"):
        assert {p.name: p.default for p in cli.commands[name].params}["device"] == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_omitted_model_says_the_demo_model_is_used(monkeypatch, caplog, model_dirs, tmp_path):
    import sparsellm.loading
    import sparsellm.pipeline
    from sparsellm.errors import ModelLoadError

    seen = []

    def no_load(spec, *a, **k):
        seen.append(spec)
        raise ModelLoadError("stop here")

    def no_compress(recipe, output, options, spec):
        seen.append(spec or recipe.model)
        raise ModelLoadError("stop here")

    monkeypatch.setattr(sparsellm.loading, "load_model", no_load)
    monkeypatch.setattr(sparsellm.pipeline, "run_recipe", no_compress)
    demo = "no --model given: using the demo model smollm2-135m (HuggingFaceTB/SmolLM2-135M-Instruct"
    for args in (["eval", "--ppl", TEXT], ["prune", "--method", "magnitude", "--sparsity", "0.5", "-o", tmp_path / "o"]):
        caplog.clear()
        assert run(*args).exit_code == 3 and seen[-1] is None
        assert [r.levelname for r in caplog.records if r.getMessage().startswith(demo)] == ["WARNING"]
    # a model named on the command line or in the recipe: nothing said
    recipe = write_recipe(tmp_path / "r.yaml", [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
                          model=str(model_dirs["llama"]))
    for args in (["eval", "--model", model_dirs["llama"], "--ppl", TEXT], ["prune", "--recipe", recipe, "-o", tmp_path / "o"]):
        caplog.clear()
        assert run(*args).exit_code == 3 and seen[-1] == str(model_dirs["llama"])
        assert not any("demo model" in r.getMessage() for r in caplog.records)
