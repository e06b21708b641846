"""Evaluation report: lm-eval accuracy on a local task, perplexity on several datasets, speed,
report.json against its schema for several recipe kinds, report.html rendered in headless Chromium,
`sparsellm compare`, the model card, and `sparsellm push` with the hub calls mocked."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydantic
import pytest
import yaml
from click.testing import CliRunner

from conftest import TEXT, cli_process
from sparsellm.cli import cli
from sparsellm.evaluate.schema import json_schema, validate
from sparsellm.evaluate.zeroshot import continuation_task

SCHEMA_FILE = Path(__file__).parent.parent / "sparsellm" / "evaluate" / "report.schema.json"
TOKEN = "hf_FAKEtokenNEVERshownXYZ0123456789"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    continuation_task(TEXT, d, name="tiny_continuation", n=24, words=6, seed=1)
    return d


@pytest.fixture(scope="module")
def runs(model_dirs, task_dir, tmp_path_factory):
    """Four real runs on the tiny Llama: pruned, data-free, allocated, sliced (per-layer)."""
    root = tmp_path_factory.mktemp("runs")
    stages = {"wanda-50": [{"prune": {"method": "wanda", "sparsity": 0.5}}],
              "magnitude-30": [{"prune": {"method": "magnitude", "sparsity": 0.3}}],
              "owl-wanda-60": [{"allocate": {"method": "owl"}}, {"prune": {"method": "wanda", "sparsity": 0.6}}],
              "slicegpt-25": [{"slice": {"method": "slicegpt", "slicing": 0.25}}]}
    out = {}
    for name, st in stages.items():
        recipe = {"calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32},
                  "evaluation": {"ppl": [str(TEXT), str(TEXT.with_name("tiny.jsonl"))], "seqlen": 32, "limit": 3,
                                 "tasks": ["tiny_continuation"], "task_paths": [str(task_dir)], "task_limit": 12,
                                 "task_batch_size": 4},
                  "stages": st}
        if name in ("magnitude-30", "owl-wanda-60"):
            recipe["evaluation"]["before"] = False  # fewer evaluations: the dense model is the same
        if name == "wanda-50":
            recipe["evaluation"]["speed"] = {"prefill_tokens": 16, "decode_prompt": 4, "decode_tokens": 3, "repeats": 3}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        r = run("prune", "--model", model_dirs["llama"], "--recipe", path, "--output", root / name)
        assert r.exit_code == 0, r.output
        out[name] = root / name
    return out


@pytest.fixture(scope="session", autouse=True)
def jsonl_copy():
    """A .jsonl evaluation source next to tiny.txt (the same documents), for the several-datasets report."""
    path = TEXT.with_name("tiny.jsonl")
    created = not path.exists()
    if created:
        lines = [ln for ln in TEXT.read_text().splitlines() if ln.strip()]
        path.write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines))
    yield
    if created:
        path.unlink()


def load(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_schema_validates_real_reports_of_every_kind(runs):
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()  # the shipped JSON Schema is current
    for name, folder in runs.items():
        r = load(folder)
        validate(r)
        assert r["schema_version"] == 3
        assert set(r["perplexity"]["after"]) == {str(TEXT), str(TEXT.with_name("tiny.jsonl"))}
        assert r["perplexity"]["seqlen"] == 32 and set(r["perplexity"]["chunks"].values()) == {3}
        assert r["model"]["disk_bytes"] == (folder / "model.safetensors").stat().st_size
    sliced = load(runs["slicegpt-25"])
    assert sliced["model"]["sliced"] and sliced["stages"][0]["details"]["hidden_size"] == [64, 48]
    assert all(0.1 < p["removed"] < 0.5 for p in sliced["sparsity"]["per_layer"])  # slicing counted as removed
    wanda = load(runs["wanda-50"])
    assert wanda["sparsity"]["removed"] == pytest.approx(0.5)
    assert wanda["model"]["nonzero_parameters"] < wanda["model"]["nonzero_parameters_before"]
    bad = dict(wanda, speed={"dense": {}})
    with pytest.raises(pydantic.ValidationError, match=r"speed\.dense\.prefill_tokens_per_s\s+Field required"):
        validate(bad)


def test_zero_shot_accuracy_on_local_task(runs):
    r = load(runs["wanda-50"])
    zs = r["zeroshot"]
    assert zs["tasks"] == ["tiny_continuation"] and zs["limit"] == 12 and zs["num_fewshot"] == 0
    for side in ("before", "after"):
        res = zs[side]["tiny_continuation"]
        assert res["samples"] == 12 and 0 <= res["acc"] <= 1 and res["dataset"]["path"] == "json"
        assert res["acc"] * 12 == pytest.approx(round(res["acc"] * 12))  # a count of right answers
    assert zs["mean_acc_after"] == zs["after"]["tiny_continuation"]["acc"]
    assert r["versions"]["lm_eval"]
    assert "accuracy tiny_continuation (n=12)" in (runs["wanda-50"] / "report.md").read_text()


def test_accuracy_matches_a_direct_loglikelihood_count(model_dirs, task_dir):
    """lm-eval's acc on the local task = share of examples whose true ending has the highest log-likelihood."""
    import torch
    import sparsellm
    from sparsellm.evaluate.zeroshot import evaluate_tasks

    model, tok = sparsellm.load(str(model_dirs["llama"]))
    res = evaluate_tasks(model, tok, ["tiny_continuation"], [str(task_dir)], limit=8, batch_size=4)["tiny_continuation"]
    rows = [json.loads(ln) for ln in (task_dir / "tiny_continuation.jsonl").read_text().splitlines()][:8]
    right = 0
    for row in rows:
        ctx = tok(row["context"]).input_ids
        scores = []
        for ending in row["endings"]:
            full = tok(row["context"] + " " + ending).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full))))
        right += int(np.argmax(scores) == row["label"])
    assert res["acc"] == pytest.approx(right / 8)


def test_speed_dense_vs_compressed_in_the_same_run(runs):
    sp = load(runs["wanda-50"])["speed"]
    assert sp["interleaved"]
    for side in ("dense", "compressed"):
        s = sp[side]
        assert len(s["prefill_runs"]) == 3 and s["prefill_tokens_per_s"] == sorted(s["prefill_runs"])[1] > 0
        assert s["decode_tokens"] == 3 and s["decode_tokens_per_s"] > 0
    assert load(runs["magnitude-30"])["speed"] is None  # optional: off unless asked


def test_suite_task_code_path_with_mocked_dataset(monkeypatch):
    """boolq through lm-eval's own task config, the hub download replaced by a local dataset."""
    import datasets
    import lm_eval.api.task as task_mod
    from conftest import _train_tokenizer, tiny_model
    from sparsellm.evaluate.zeroshot import evaluate_tasks, expand

    assert expand(["suite"])[:2] == ["boolq", "rte"] and len(expand(["suite", "boolq"])) == 8
    rows = [{"question": f"is this question {i}", "passage": "A passage about things.", "idx": i, "label": i % 2}
            for i in range(6)]
    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in ("train", "validation")})

    monkeypatch.setattr(task_mod.datasets, "load_dataset", fake_load)
    res = evaluate_tasks(tiny_model("llama"), _train_tokenizer(), ["boolq"], limit=4, batch_size=4)["boolq"]
    assert calls and "super_glue" in str(calls[0]) and "boolq" in str(calls[0])
    assert res["samples"] == 4 and 0 <= res["acc"] <= 1


def test_eval_command_with_tasks_and_limit_offline(model_dirs, task_dir):
    """A real process with the hub switched off: local tasks need no network."""
    r = cli_process("eval", "--model", model_dirs["qwen2"], "--tasks", "tiny_continuation", "--task-path", task_dir,
                    "--limit", 5, "--ppl", TEXT, "--seqlen", 32, "--json",
                    env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tasks"]["tiny_continuation"]["samples"] == 5 and 1 < res["perplexity"][str(TEXT)]


def _screenshot(html: Path, png: Path, size=(1200, 1600)) -> np.ndarray:
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: scripts/setup.sh installs it (apt-get install chromium)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={png.parent / 'chromium-profile'}", f"--screenshot={png}",
                    f"--window-size={size[0]},{size[1]}", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert img.shape == (size[1], size[0], 3)
    return img


def _self_contained(text: str) -> None:
    assert "<img" in text and "data:image/png;base64," in text
    for ref in ("http://", "https://", "src=\"//", "<script", "<link"):
        assert ref not in text, ref


def test_report_html_renders_in_headless_chromium(runs, tmp_path):
    html = runs["owl-wanda-60"] / "report.html"
    text = html.read_text()
    _self_contained(text)
    assert text.count("data:image/png;base64,") == 2  # metrics chart + per-layer chart
    img = _screenshot(html, tmp_path / "report.png")
    assert img.std() > 20  # not a blank page
    # the plots sit in the middle of the page: that area is not uniform either
    assert img[500:1300, 40:900].std() > 20 and len(np.unique(img[500:1300, 40:900].reshape(-1, 3), axis=0)) > 50


def test_compare_runs_html_md_json(runs, tmp_path):
    out = tmp_path / "cmp" / "compare.html"
    r = run("compare", *runs.values(), "--output", out)
    assert r.exit_code == 0, r.output
    summary = json.loads(out.with_suffix(".json").read_text())
    by = {x["run"]: x for x in summary["runs"]}
    assert set(by) == set(runs)
    assert by["wanda-50"]["x"] == pytest.approx(0.5) and by["magnitude-30"]["x"] == pytest.approx(0.3, abs=1e-3)
    sliced = load(runs["slicegpt-25"])["model"]
    assert by["slicegpt-25"]["x"] == pytest.approx(1 - sliced["parameters"] / sliced["parameters_before"])
    assert by["slicegpt-25"]["structured"] and by["wanda-50"]["family"] == "wanda"
    assert by["wanda-50"]["accuracy"]["tiny_continuation"] is not None
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| ") >= 5 and "ppl tiny.jsonl" in md and "acc tiny_continuation" in md
    text = out.read_text()
    _self_contained(text)
    assert text.count("data:image/png;base64,") == 2  # perplexity curves + accuracy curve
    img = _screenshot(out, tmp_path / "compare.png", size=(1300, 1500))
    assert img.std() > 20 and img[500:1400, 40:1200].std() > 20


def test_compare_counts_removed_parameters_for_structured_runs():
    """A structure stage (like a slice stage) deletes rows and columns: x is the share of parameters
    removed, not the near-zero sparsity of the remaining weights."""
    from sparsellm.evaluate.compare import removed

    def report(kind):
        return {"model": {"parameters": 80, "parameters_before": 100}, "stages": [{"kind": kind}],
                "sparsity": {"overall": 0.0003}}

    assert removed(report("structure")) == pytest.approx(0.2) == removed(report("slice"))
    assert removed(report("prune")) == 0.0003


def test_compare_labels_of_close_points_do_not_overlap():
    """Two runs at the same sparsity with nearly the same perplexity: the second label moves a line
    down; a distant point keeps the default offset."""
    from sparsellm.evaluate.compare import _label_offsets, _pyplot

    fig, ax = _pyplot().subplots(figsize=(6, 4), dpi=100)
    ax.plot([0.5, 0.5, 0.1], [65.9, 63.0, 400.0], "o")
    ax.set_xlim(-0.05, 0.6)
    offsets = _label_offsets(ax, [(0.5, 65.9, "wanda-50"), (0.5, 63.0, "sparsegpt-50"), (0.1, 400.0, "far")])
    assert offsets[0] == 4.0 and offsets[1] < -4.0 and offsets[2] == 4.0


def test_compare_rejects_a_folder_without_report(runs, tmp_path):
    r = run("compare", runs["wanda-50"], tmp_path)
    assert r.exit_code == 5 and f"error: no report.json in {tmp_path}" in r.output


def test_model_card_metadata_parses(runs, model_dirs, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(runs["wanda-50"] / "README.md")
    data = card.data.to_dict()
    assert {"pruned", "wanda", "sparsity-50", "sparsellm"} <= set(data["tags"])
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    results = {(e.dataset_name, e.metric_type): e.metric_value for e in card.data.eval_results}
    r = load(runs["wanda-50"])
    assert results[("tiny.txt (local file)", "perplexity")] == pytest.approx(r["perplexity"]["after"][str(TEXT)], abs=1e-4)
    assert results[("tiny_continuation", "accuracy")] == pytest.approx(r["zeroshot"]["after"]["tiny_continuation"]["acc"], abs=1e-4)
    assert "```yaml" in card.text and "from_pretrained('wanda-50')" in card.text
    sliced = ModelCard.load(runs["slicegpt-25"] / "README.md")
    assert {"sliced", "slicegpt"} <= set(sliced.data.tags) and "trust_remote_code=True" in sliced.text
    # license and base model carried from the base: the folder's README front matter
    base = tmp_path / "base"
    shutil.copytree(model_dirs["llama"], base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    out = tmp_path / "pruned"
    assert run("prune", "--model", base, "--method", "magnitude", "--sparsity", "0.5", "--pattern", "2:4",
               "-o", out).exit_code == 0
    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert meta["license"] == "mit" and "2:4" in meta["tags"]
    # regenerable from report.json, with the repo id in the loading example
    (out / "README.md").unlink()
    assert run("report", out, "--repo-id", "me/tiny-2of4").exit_code == 0
    assert "from_pretrained('me/tiny-2of4')" in (out / "README.md").read_text()


def test_gguf_license_and_hub_base_model():
    from sparsellm.loading.models import resolve_model, source_info

    info = source_info(resolve_model("smollm2-135m"))
    assert info["license"] == "apache-2.0" and info["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["source_disk_bytes"] > 50e6


def test_lm_eval_keeps_every_metric_and_filter_and_its_results_json(runs):
    """gsm8k-style results: metrics under several filters are all kept ("metric,filter" past "none"), and
    lm-eval's own results JSON of each evaluation lies beside report.json."""
    from sparsellm.evaluate.card import card_data
    from sparsellm.evaluate.zeroshot import summarize

    out = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                                 "exact_match,flexible-extract": 0.375, "exact_match_stderr,flexible-extract": "N/A"}},
           "n-samples": {"gsm8k": {"original": 1319, "effective": 8}}, "n-shot": {"gsm8k": 5},
           "configs": {"gsm8k": {"dataset_path": "openai/gsm8k", "dataset_name": "main"}}}
    row = summarize(out)["gsm8k"]
    assert row == {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                   "exact_match,flexible-extract": 0.375, "samples": 8,
                   "dataset": {"path": "openai/gsm8k", "name": "main"}, "num_fewshot": 5}
    report = load(runs["wanda-50"])
    report["zeroshot"]["after"] = {"gsm8k": row}
    entries = {(e.dataset_type, e.metric_type, e.metric_name): e.metric_value for e in card_data(report, "x").eval_results}
    assert entries[("openai/gsm8k", "exact_match", "exact_match (strict-match)")] == 0.25
    assert entries[("openai/gsm8k", "exact_match", "exact_match (flexible-extract)")] == 0.375
    assert not any("stderr" in k[2] for k in entries)

    folder = runs["wanda-50"]
    for side in ("before", "after"):
        raw = json.loads((folder / f"lm_eval_results_{side}.json").read_text())
        acc = load(folder)["zeroshot"][side]["tiny_continuation"]["acc"]
        assert raw["results"]["tiny_continuation"]["acc,none"] == acc
        assert raw["n-samples"]["tiny_continuation"]["effective"] == 12 and "samples" not in raw
    # a run without the "before" evaluation has only the "after" file
    assert {p.name for p in runs["magnitude-30"].glob("lm_eval_results_*.json")} == {"lm_eval_results_after.json"}


def test_export_to_bitmask_carries_a_card_that_says_how_to_load_it(runs, tmp_path):
    """`sparsellm export` rewrites the report and the card for the new format: a bitmask folder's card
    loads it with sparsellm (or exports it dense), not with plain from_pretrained."""
    from huggingface_hub import ModelCard

    small, plain = tmp_path / "small", tmp_path / "plain"
    assert run("export", runs["wanda-50"], "--format", "sparse-bitmask", "-o", small).exit_code == 0
    names = {p.name for p in small.iterdir()}
    assert {"README.md", "report.json", "report.md", "report.html", "recipe.yaml", "lm_eval_results_before.json",
            "lm_eval_results_after.json"} <= names
    report = load(small)
    validate(report)
    weights = sum(p.stat().st_size for p in small.glob("*.safetensors"))
    dense = report["export"].pop("dense_bytes")  # what a dense float32 export took: that of the run exported
    assert report["export"] == {"format": "sparse-bitmask", "weights_bytes": weights, "dtype": "float32"}
    assert report["model"]["disk_bytes"] == weights and dense == load(runs["wanda-50"])["export"]["weights_bytes"]
    assert weights < load(runs["wanda-50"])["model"]["disk_bytes"]
    card = ModelCard.load(small / "README.md")
    assert "sparse-bitmask" in card.text and "model, tokenizer = sparsellm.load('small')" in card.text
    assert "sparsellm export small --format dense --output plain/" in card.text
    assert "from_pretrained" not in card.text and "zeros stored in dense tensors" not in card.text
    assert card.data.eval_results  # the measured results stay in the model-index
    assert "pypi.org" not in card.text  # no link to a package page
    assert "--output RUN` (a local model), then `sparsellm export RUN --format sparse-bitmask --output small`." in card.text
    # and back: a dense folder loads with from_pretrained again
    assert run("export", small, "--format", "dense", "-o", plain).exit_code == 0
    text = (plain / "README.md").read_text()
    assert "from_pretrained('plain')" in text and "sparsellm.load" not in text
    assert load(plain)["export"]["format"] == "dense"
    assert run("push", small, "--repo-id", "me/small", "--dry-run").exit_code == 0


def test_card_of_a_local_model_publishes_no_local_path(runs, model_dirs, tmp_path):
    """base_model from the folder's config (_name_or_path as transformers 4 saved it) when it is a hub
    id, else none; the reproduce line and the recipe show placeholders and file names, not paths."""
    from huggingface_hub import ModelCard

    from sparsellm.loading.models import resolve_model, source_info

    base = tmp_path / "base"
    shutil.copytree(model_dirs["llama"], base)
    cfg = json.loads((base / "config.json").read_text())
    for name_or_path, expected in (("org/tiny-base", "org/tiny-base"), (str(tmp_path / "somewhere"), None),
                                   ("../up/model", None), ("https://huggingface.co/org/x", "org/x")):
        (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": name_or_path}))
        assert source_info(resolve_model(str(base)))["base_model"] == expected
    (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "org/tiny-base"}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(base), "calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16},
                                      "evaluation": {"ppl": [str(TEXT)], "seqlen": 16, "limit": 1},
                                      "stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}]}))
    out = tmp_path / "out"
    r = run("prune", "--recipe", recipe, "-o", out)
    assert r.exit_code == 0, r.output
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-base" and "`org/tiny-base` compressed with sparsellm" in text
    assert "--model PATH/TO/BASE_MODEL --recipe recipe.yaml --output out` (PATH/TO/BASE_MODEL: a local copy of " \
           "`org/tiny-base`)" in text
    assert str(tmp_path) not in text and str(TEXT.parent) not in text and "tiny.txt" in text
    # without a hub id anywhere: no base_model, still no path
    (base / "config.json").write_text(json.dumps(cfg))
    assert run("prune", "--recipe", recipe, "-o", out, "--overwrite").exit_code == 0
    text = (out / "README.md").read_text()
    assert ModelCard.load(out / "README.md").data.base_model is None
    assert text.count("A local model compressed with sparsellm") == 1 and str(tmp_path) not in text


def test_gguf_base_model_from_its_metadata_or_the_demo_file(tmp_path):
    import gguf

    from sparsellm.loading.models import DEMO_MODELS, resolve_model, source_info

    demo = resolve_model("smollm2-135m")  # the same file given by its path
    by_path = source_info(resolve_model(str(Path(demo.path) / DEMO_MODELS["smollm2-135m"][1])))
    assert by_path["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and by_path["license"] == "apache-2.0"
    for key, url, expected in (("general.base_model.0.repo_url", "https://huggingface.co/org/base-7b", "org/base-7b"),
                               ("general.source.repo_url", "https://example.com/not/hub", None)):
        path = tmp_path / f"{key}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_license("mit")
        writer.add_string(key, url)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        info = source_info(resolve_model(str(path)))
        assert info["base_model"] == expected and info["license"] == "mit"


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, branch, exist_ok=False):
        FakeApi.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision=None, repo_type=None, ignore_patterns=None, commit_message=None):
        FakeApi.calls.append(("upload_folder", repo_id, folder_path, revision, ignore_patterns))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_uploads_with_mocked_hub(runs, monkeypatch, tmp_path):
    import huggingface_hub

    folder = tmp_path / "wanda-50"
    shutil.copytree(runs["wanda-50"], folder)
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = run("push", folder, "--repo-id", "me/tiny-wanda", "--private", "--revision", "v1")
    assert r.exit_code == 0, r.output
    assert FakeApi.calls[0] == ("init", TOKEN)
    assert ("create_repo", "me/tiny-wanda", True, True) in FakeApi.calls
    assert ("create_branch", "me/tiny-wanda", "v1") in FakeApi.calls
    up = [c for c in FakeApi.calls if c[0] == "upload_folder"][0]
    assert up[1:4] == ("me/tiny-wanda", str(folder), "v1")
    assert "from_pretrained('me/tiny-wanda')" in (folder / "README.md").read_text()
    # the token is nowhere: not in the output, not in any file of the folder
    assert TOKEN not in r.output
    for f in folder.iterdir():
        assert TOKEN.encode() not in f.read_bytes(), f


def test_push_dry_run_lists_files_and_uploads_nothing(runs, monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = run("push", runs["magnitude-30"], "--repo-id", "me/m30", "--dry-run")
    assert r.exit_code == 0, r.output
    assert FakeApi.calls == [] and TOKEN not in r.output
    assert "token found" in r.output
    for name in ("model.safetensors", "README.md", "report.html", "report.json", "config.json"):
        assert f"  {name}  " in r.output


# ---- lm-eval with the chat template --------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def rendered_chats(monkeypatch):
    """Every conversation a tokenizer renders through its chat template (transformers' apply_chat_template)."""
    from transformers import PreTrainedTokenizerBase

    calls, original = [], PreTrainedTokenizerBase.apply_chat_template

    def spy(self, conversation, *args, **kwargs):
        calls.append(conversation)
        return original(self, conversation, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", spy)
    return calls


def test_apply_chat_template_reaches_lm_eval(model_dirs, task_dir, tokenizer, rendered_chats, tmp_path):
    """--apply-chat-template (prune and eval): lm-eval renders each example's passage as a user turn through the
    tokenizer's chat template; the report and recipe say so. Without the flag nothing is rendered; a tokenizer
    without a chat template, or the flag without tasks, is refused with one line before any work."""
    import copy

    chat_model = tmp_path / "chat-model"
    shutil.copytree(model_dirs["llama"], chat_model)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat_model)
    contexts = {json.loads(ln)["context"] for ln in (task_dir / "tiny_continuation.jsonl").read_text().splitlines()}
    task = ("--tasks", "tiny_continuation", "--task-path", task_dir, "--limit", 3)

    r = run("prune", "--model", chat_model, "--method", "magnitude", "--sparsity", 0.3, *task, "-o", tmp_path / "plain")
    assert r.exit_code == 0, r.output
    assert rendered_chats == [] and load(tmp_path / "plain")["zeroshot"]["apply_chat_template"] is False
    assert "apply_chat_template" not in (tmp_path / "plain" / "recipe.yaml").read_text()  # the default is not written

    out = tmp_path / "chat"
    r = run("prune", "--model", chat_model, "--method", "magnitude", "--sparsity", 0.3, *task, "--apply-chat-template",
            "-o", out)
    assert r.exit_code == 0, r.output
    users = [turn["content"] for chat in rendered_chats for turn in chat if turn["role"] == "user"]
    assert len(users) == len(rendered_chats) and len(set(users)) == 3 and set(users) <= contexts  # 3 examples, before and after
    report = load(out)
    validate(report)
    assert report["zeroshot"]["apply_chat_template"] is True and report["zeroshot"]["after"]["tiny_continuation"]["samples"] == 3
    assert "apply_chat_template: true" in (out / "recipe.yaml").read_text()
    assert "| accuracy tiny_continuation (n=3, chat template) |" in (out / "report.md").read_text()

    rendered_chats.clear()
    r = run("eval", "--model", chat_model, *task, "--apply-chat-template", "--json")
    assert r.exit_code == 0, r.output
    assert len(rendered_chats) >= 3 and {t["content"] for c in rendered_chats for t in c} <= contexts

    r = run("prune", "--model", model_dirs["llama"], "--method", "magnitude", "--sparsity", 0.3, *task,
            "--apply-chat-template", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "evaluation.apply_chat_template: the tokenizer of" in r.output
    assert "has no chat template; evaluate without --apply-chat-template" in r.output and not (tmp_path / "x").exists()
    r = run("eval", "--model", model_dirs["llama"], *task, "--apply-chat-template")
    assert r.exit_code == 2 and "has no chat template" in r.output
    r = run("prune", "--model", chat_model, "--method", "magnitude", "--sparsity", 0.3, "--apply-chat-template",
            "-o", tmp_path / "y")
    assert r.exit_code == 2 and "apply_chat_template renders the prompts of lm-eval tasks, but no tasks are given" in r.output
