"""Crash safety: a real `sparsellm prune` process is SIGKILLed at a chosen point (the fault hook in
sparsellm/faults.py), then resumed from its checkpoint; the output must equal, byte for byte, that of
an uninterrupted run without any checkpoint."""
import json
import signal
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import TEXT, cli_process, tiny_model
from sparsellm.cli import cli

LAYERS = 4
# fields of report.json that legitimately differ between runs: wall time, memory, what was resumed
VOLATILE_STAGE = ("seconds", "compute_seconds", "peak_rss_bytes", "peak_cuda_bytes")
VOLATILE_TOP = ("timings", "memory", "resumed")


@pytest.fixture(scope="module")
def model4(tmp_path_factory, tokenizer):
    """A tiny Llama with 4 decoder layers, so that a kill can fall between checkpointed layers."""
    d = tmp_path_factory.mktemp("model4")
    tiny_model("llama", num_hidden_layers=LAYERS).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Every kind of state a checkpoint must carry: an allocation, a prune stage, DSnoT's counters,
    activations between layers, and the perplexity before."""
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 0, "calibration": {"dataset": str(TEXT), "nsamples": 6, "seqlen": 32, "batch_size": 4},
        "evaluation": {"ppl": [str(TEXT)], "seqlen": 32, "limit": 2},
        "stages": [{"allocate": {"method": "owl"}}, {"prune": {"method": "wanda", "sparsity": 0.6}},
                   {"refine": {"method": "dsnot"}}]}))
    return path


@pytest.fixture(scope="module")
def reference(model4, recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(recipe), "--output", str(out)])
    assert r.exit_code == 0, r.output
    return out


def prune_process(model, recipe, out, ckpt, kill_at):
    return cli_process("prune", "--model", model, "--recipe", recipe, "--output", out, "--checkpoint-dir", ckpt,
                       env={"SPARSELLM_TEST_KILL_AT": kill_at})


def stable_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    for key in VOLATILE_TOP:
        report.pop(key)
    for stage in report["stages"]:
        for key in VOLATILE_STAGE:
            stage.pop(key)
    return report


def assert_same_output(out: Path, ref: Path) -> None:
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name == "report.json":
            assert stable_report(out / name) == stable_report(ref / name)
        elif name not in ("report.md", "report.html"):  # timings and memory only; the same numbers as report.json
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.parametrize("kill_at,restored", [
    ("stats:0", {"ppl_before": True}),  # calibrating the first layer (in OWL's pass): no layer saved yet
    ("save:2", {"allocation0": True, "ppl_before": True, "stage1": 2}),  # mid-save of layer 2: 0 and 1 committed
    ("export", {"allocation0": True, "ppl_before": True, "stage1": LAYERS}),  # output files written, not renamed
])
def test_kill_then_resume_gives_identical_output(kill_at, restored, model4, recipe, reference, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    killed = prune_process(model4, recipe, out, ckpt, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    assert (ckpt / "state.json").is_file()
    if kill_at == "save:2":  # the torn save: layer 2's files are there, under temp names or not committed
        state = json.loads((ckpt / "state.json").read_text())
        assert state["passes"]["stage1"]["layers_done"] == 2

    # the resumed run may as well be in-process: only the kill needs a real process
    resumed = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(recipe), "--output", str(out),
                                       "--checkpoint-dir", str(ckpt), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_output(out, reference)
    assert json.loads((out / "report.json").read_text())["resumed"] == restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder, checkpoint removed


def test_checkpointing_run_without_a_crash_matches_and_cleans_up(model4, recipe, reference, tmp_path):
    r = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(recipe), "--output",
                                 str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert r.exit_code == 0, r.output
    assert_same_output(tmp_path / "out", reference)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["resumed"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture(scope="module")
def rec_recipe(tmp_path_factory):
    """A prune pass, then the reconstruct stage's own pass (two activation streams between blocks)."""
    path = tmp_path_factory.mktemp("rec") / "r.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 0, "calibration": {"dataset": str(TEXT), "nsamples": 6, "seqlen": 32, "batch_size": 4},
        "evaluation": {"ppl": [str(TEXT)], "seqlen": 32, "limit": 2, "before": False},
        "stages": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}},
                   {"reconstruct": {"method": "blockwise", "epochs": 2, "lr": 0.05, "batch_size": 2, "holdout": 0.34}}]}))
    return path


@pytest.fixture(scope="module")
def rec_reference(model4, rec_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("recref") / "out"
    r = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(rec_recipe), "--output", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("kill_at,restored", [
    ("reconstruct:0", {"stage0": LAYERS}),  # first block trained, not saved: the prune pass is all there is
    ("reconstruct:2", {"stage0": LAYERS, "stage1": 2}),  # blocks 0 and 1 reconstructed and committed
])
def test_reconstruct_kill_then_resume_gives_identical_output(kill_at, restored, model4, rec_recipe, rec_reference, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    killed = prune_process(model4, rec_recipe, out, ckpt, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    resumed = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(rec_recipe), "--output", str(out),
                                       "--checkpoint-dir", str(ckpt), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_output(out, rec_reference)
    assert json.loads((out / "report.json").read_text())["resumed"] == restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture(scope="module")
def reference_streamed(model4, recipe, tmp_path_factory):
    """The same recipe with --low-memory (each decoder layer read from the shards and written to its own)."""
    out = tmp_path_factory.mktemp("ref-lowmem") / "out"
    r = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(recipe), "--output", str(out),
                                 "--low-memory"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["low_memory"]["reason"] == "requested (--low-memory)"
    return out


@pytest.mark.parametrize("kill_at,restored", [
    ("stats:0", {"ppl_before": True}),
    ("save:1", {"allocation0": True, "ppl_before": True, "stage1": 1}),  # torn save of layer 1: layer 0 committed
    ("save:3", {"allocation0": True, "ppl_before": True, "stage1": 3}),  # the last layer's save torn
    ("export", {"allocation0": True, "ppl_before": True, "stage1": LAYERS}),
])
def test_kill_then_resume_a_low_memory_run(kill_at, restored, model4, recipe, reference_streamed, tmp_path):
    """A streamed run killed anywhere resumes (layers restored from the checkpoint are written to the new
    output's shards) to the bytes of an uninterrupted streamed run."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    killed = cli_process("prune", "--model", model4, "--recipe", recipe, "--output", out, "--checkpoint-dir", ckpt,
                         "--low-memory", env={"SPARSELLM_TEST_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and (ckpt / "state.json").is_file()
    resumed = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(recipe), "--output", str(out),
                                       "--checkpoint-dir", str(ckpt), "--resume", "--low-memory"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_output(out, reference_streamed)
    assert json.loads((out / "report.json").read_text())["resumed"] == restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_reconstruct_kill_then_resume_a_low_memory_run(model4, rec_recipe, tmp_path):
    """The reconstruct pass of a streamed run (dense layers re-read from the source shards) resumes too."""
    ref = tmp_path / "uninterrupted" / "out"  # the same folder name: the model card names it
    r = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(rec_recipe), "--output", str(ref),
                                 "--low-memory"])
    assert r.exit_code == 0, r.output
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    killed = cli_process("prune", "--model", model4, "--recipe", rec_recipe, "--output", out, "--checkpoint-dir", ckpt,
                         "--low-memory", env={"SPARSELLM_TEST_KILL_AT": "reconstruct:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(rec_recipe), "--output", str(out),
                                       "--checkpoint-dir", str(ckpt), "--resume", "--low-memory"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_output(out, ref)
    assert json.loads((out / "report.json").read_text())["resumed"] == {"stage0": LAYERS, "stage1": 2}


def test_kill_then_resume_a_one_pass_run(model4, tmp_path):
    """True-sequential Wanda runs one forward per layer on every window at once (calibrate/engine.py:
    _one_pass_layer); killed mid-save, it resumes from the single saved batch to the uninterrupted bytes."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed": 0, "calibration": {"dataset": str(TEXT), "nsamples": 6, "seqlen": 32, "batch_size": 4},
        "evaluation": {"ppl": [str(TEXT)], "seqlen": 32, "limit": 2, "before": False},
        "stages": [{"prune": {"method": "wanda", "pattern": "2:4", "true_sequential": True}}, {"refine": {"method": "dsnot"}}]}))
    ref = tmp_path / "ref" / "out"  # the model card names the output folder
    r = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(recipe), "--output", str(ref)])
    assert r.exit_code == 0, r.output
    out, ckpt = tmp_path / "run" / "out", tmp_path / "ckpt"
    killed = prune_process(model4, recipe, out, ckpt, "save:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = CliRunner().invoke(cli, ["prune", "--model", str(model4), "--recipe", str(recipe), "--output", str(out),
                                       "--checkpoint-dir", str(ckpt), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_output(out, ref)
    assert json.loads((out / "report.json").read_text())["resumed"] == {"stage0": 2}
