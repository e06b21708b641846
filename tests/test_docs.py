"""The documentation and the shipped files of a fresh checkout: every relative link in README.md and
docs/ leads to a file (and heading) that exists, nothing refers to files outside the repository, and
every shipped recipe validates and runs (small) once the demo data step has written data/, and the
recipe reference in docs/recipes.md is the one generated from the schema."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import TEXT
from sparsellm.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_anchor(m[1]) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    links = [m for m in LINK.findall(text) if not m.startswith(("http://", "https://", "mailto:"))]
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_file() and ROOT in target.parents, f"{page.name}: broken link {link}"
        if anchor:
            assert anchor in _anchors(target), f"{page.name}: no heading #{anchor} in {target.name}"


def test_readme_is_short_and_docs_are_linked():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    readme = "\n".join(lines)
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
    # the error message of an invalid recipe points here
    assert "## Recipe reference" in readme


def test_nothing_refers_to_files_outside_the_repository():
    files = [*PAGES, *(ROOT / "recipes").glob("*.yaml"), *(ROOT / "scripts").iterdir(), *(ROOT / "tests").glob("*.py"),
             *(ROOT / "sparsellm").rglob("*.py"), ROOT / "pyproject.toml"]
    pattern = re.compile(r"\.\./shared|\bshared/(data|BENCHMARK)|BENCHMARK\.md")
    for f in files:
        if f.is_file() and f != Path(__file__).resolve():
            hits = [ln for ln in f.read_text(encoding="utf-8").splitlines() if pattern.search(ln)]
            assert not hits, f"{f.relative_to(ROOT)} refers outside the repository: {hits[0].strip()}"
    # the demo data files are named by their path in the checkout
    for page in PAGES:
        assert not re.search(r"(?<![/\w])lee_(eval|calib)\.txt", page.read_text(encoding="utf-8")), page.name


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_validates_in_a_fresh_checkout(recipe, tmp_path, monkeypatch):
    """As after `bash scripts/get_demo_data.sh` in a fresh clone: the data/ files exist, nothing else."""
    (tmp_path / "data").mkdir()
    for name in ("lee_calib.txt", "lee_eval.txt"):
        shutil.copyfile(TEXT, tmp_path / "data" / name)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(Path("recipes") / recipe.name)
    assert r.stages
    sources = [r.calibration.dataset, *r.evaluation.ppl]
    for source in sources:
        assert source in ("wikitext2", "c4") or source.startswith("data/"), source


# ---- the recipe reference in docs/recipes.md, generated from the schema ---------------------------------

def test_recipe_reference_in_docs_is_the_schema():
    """docs/recipes.md carries reference_markdown() verbatim between its markers, with prose outside them;
    regenerate with `python -m sparsellm.reference --write docs/recipes.md`."""
    from sparsellm.reference import generated_part, reference_markdown

    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert generated_part(text) == reference_markdown(), \
        "docs/recipes.md is stale: run python -m sparsellm.reference --write docs/recipes.md"
    assert text.index("## Field reference") < text.index("<!-- generated:")


def _section(reference: str, heading: str) -> str:
    return reference.split(heading + "\n", 1)[1].split("\n#", 1)[0]


def test_recipe_reference_has_every_method_and_field():
    from sparsellm import stage
    from sparsellm.recipe import Calibration, Evaluation, Export, Speed
    from sparsellm.reference import reference_markdown

    ref = reference_markdown()
    sections = {"### calibration": Calibration, "### evaluation": Evaluation, "### evaluation.speed": Speed,
                "### export": Export}
    for kind in stage.KINDS:
        for name in stage.methods(kind):
            sections[f"##### {kind}: {name}"] = stage.spec_class(kind, name)
    assert len([k for k in sections if k.startswith("#####")]) == 13  # every built-in method
    for heading, model in sections.items():
        body = _section(ref, heading)
        for field, info in model.model_fields.items():
            if field != "method":
                assert f"| `{info.alias or field}` |" in body, f"{heading}: no row for {field}"
        rows = [ln for ln in body.splitlines() if ln.startswith("| `")]
        assert len(rows) == len([f for f in model.model_fields if f != "method"]), heading
    # the rows say what the schema says: type with range, YAML default, description
    wanda = _section(ref, "##### prune: wanda")
    assert ("| `sparsity` | float or null, in [0, 1) | `null` | fraction of weights set to zero; required unless an "
            "N:M pattern implies it |") in wanda
    assert "| `lambda` | float, in [0, 1) | `0.08` | layer sparsities span target ± lambda |" in ref
    assert "| `tau` | [float, float] | `[4.0, 0.05]` |" in ref
    assert "| `format` | `dense`, `sparse-bitmask` or `sparse-24-bitmask` | `dense` |" in ref
    assert "| `stages` | list of mapping | required |" in ref
    assert "compare \\|W\\| across" in ref  # a pipe in a description does not split the table's cell


def test_reference_type_and_bound_words():
    from typing import Literal

    from pydantic import Field

    from sparsellm.reference import bounds, type_name

    assert type_name(int | None) == "int or null"
    assert type_name(list[float] | None) == "list of float or null"
    assert type_name(Literal["a", "b", "c"]) == "`a`, `b` or `c`"
    assert type_name(tuple[float, float]) == "[float, float]"
    assert bounds(Field(0.5, ge=0.0, lt=1.0).metadata) == "in [0, 1)"
    assert bounds(Field(1.0, gt=0.0, le=1.0).metadata) == "in (0, 1]"
    assert bounds(Field(8, gt=0).metadata) == "> 0"
    assert bounds(Field(0, ge=0).metadata) == "≥ 0"
    assert bounds(Field(0.1, le=0.5).metadata) == "≤ 0.5"
    assert bounds(Field(0).metadata) == ""


# ---- every shipped recipe runs, small, from a fresh checkout ---------------------------------------------

# training lengths that the command line does not override (recipe, entry, field: value), shortened in the copy
TRAINING_STEPS = {"cfsp-20-lora.yaml": (1, "steps", 3), "maskllm-sparsegpt-2of4.yaml": (0, "steps", 3)}


@pytest.fixture(scope="module")
def fresh_checkout(tmp_path_factory, tokenizer):
    """What a user has after cloning and `bash scripts/get_demo_data.sh`: recipes/ and data/ (here the test
    text under the demo's file names), and a tiny random Llama (context 1024: the demo and MaskLLM recipes
    evaluate 512-token chunks) standing in for the model. The two recipes that train run 3 steps."""
    import yaml

    from conftest import tiny_model

    root = tmp_path_factory.mktemp("checkout")
    (root / "data").mkdir()
    for name in ("lee_calib.txt", "lee_eval.txt"):
        shutil.copyfile(TEXT, root / "data" / name)
    shutil.copytree(ROOT / "recipes", root / "recipes")
    for name, (entry, key, value) in TRAINING_STEPS.items():
        path = root / "recipes" / name
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        next(iter(data["stages"][entry].values()))[key] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tiny_model("llama", max_position_embeddings=1024).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    return root


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_runs_small_in_a_fresh_checkout(recipe, fresh_checkout, monkeypatch):
    """Each shipped recipe through `sparsellm prune --recipe`, as written (its stages, their settings, its data
    files), made seconds-long on the command line: the tiny model, 2 windows of 32 tokens, one evaluation chunk,
    and the demo text instead of the hub's wikitext2 / c4 (no network in tests); training recipes run 3 steps
    (TRAINING_STEPS). Exit 0 and a complete folder."""
    from click.testing import CliRunner

    from sparsellm import load
    from sparsellm.cli import cli
    from sparsellm.evaluate.schema import validate

    monkeypatch.chdir(fresh_checkout)
    shipped = load_recipe(recipe)  # the file in the repository
    expected = [st.spec.model_dump(mode="json", by_alias=True) for st in shipped.stages]
    if recipe.name in TRAINING_STEPS:
        entry, key, value = TRAINING_STEPS[recipe.name]
        expected[entry][key] = value
    args = ["prune", "--recipe", f"recipes/{recipe.name}", "--model", "tiny", "--nsamples", 2, "--seqlen", 32,
            "--limit", 1, "--device", "cpu", "--output", f"out/{recipe.stem}"]
    if shipped.calibration.dataset in ("wikitext2", "c4"):
        args += ["--calib", "data/lee_calib.txt"]
    if any(s in ("wikitext2", "c4") for s in shipped.evaluation.ppl):
        args += ["--ppl", "data/lee_eval.txt"]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    out = fresh_checkout / "out" / recipe.stem
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "report.json", "report.md",
            "report.html", "README.md"} <= files, files
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    validate(report)
    # the recipe's own stages ran, with its settings; the command line changed only the data and sizes
    assert [s["kind"] for s in report["stages"]] == [st.kind for st in shipped.stages]
    assert [s["settings"] for s in report["stages"]] == expected
    assert report["export"]["format"] == shipped.export.format
    assert bool(report["perplexity"]) == bool(shipped.evaluation.ppl)
    m = report["model"]
    kinds = {st.kind for st in shipped.stages}
    assert kinds & {"prune", "learn", "slice", "structure"}, kinds  # every shipped recipe compresses
    if kinds & {"prune", "learn"}:  # masks: at least 2:4's half of the targeted weights, a tenth of all
        assert report["sparsity"]["overall"] > 0.1
    if kinds & {"slice", "structure"}:  # removed rows and columns
        assert m["parameters"] < 0.95 * m["parameters_before"]
    model, _ = load(str(out))  # and the folder loads back
    assert model.config.num_hidden_layers == 2
