"""The documentation and the shipped files of a fresh checkout: every relative link in README.md and
docs/ leads to a file (and heading) that exists, nothing refers to files outside the repository, and
every shipped recipe validates once the demo data step has written data/."""
from __future__ import annotations

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
    assert len([k for k in sections if k.startswith("#####")]) == 12  # every built-in method
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
