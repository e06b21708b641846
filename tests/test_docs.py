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
