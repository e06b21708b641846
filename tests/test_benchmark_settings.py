"""Every results row of docs/benchmarks.md (the full results; README shows a summary of them) can be reproduced: it names the scripts/benchmark.py setting that
produced it (a "setting" column of exact names, or a "benchmark setting(s)" column of `names`, or
"external: ..." for the authors' reference code), and every named setting exists and is a valid recipe."""
from __future__ import annotations

import importlib.util
import re

import pytest

from conftest import ROOT
from sparsellm.recipe import recipe_from_dict

RESULTS = ROOT / "docs" / "benchmarks.md"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results_tables() -> list[list[list[str]]]:
    """The markdown tables of docs/benchmarks.md's result sections (after the protocol), as rows of stripped
    cells (header first)."""
    text = RESULTS.read_text(encoding="utf-8")
    section = text[text.index("\n## One-shot pruning"):]
    tables, current = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append([r for r in current if not set("".join(r)) <= set("-: ")])
            current = []
    return tables


def named_settings() -> list[tuple[str, str]]:
    """(row, setting name) for every name the Results tables give."""
    names, tables_with_names = [], 0
    for table in results_tables():
        header, rows = table[0], table[1:]
        cols = [i for i, h in enumerate(header) if h == "setting" or h.startswith("benchmark setting")]
        tables_with_names += bool(cols)
        for row in rows:
            for i in cols:
                cell = row[i].replace("**", "").strip()
                if header[i] == "setting":
                    names.append((row[0], cell))
                    continue
                if cell.startswith("external:"):
                    continue
                found = re.findall(r"`([^`]+)`", cell)
                assert found and re.sub(r"`[^`]+`|,|\s", "", cell) == "", f"row {row[0]!r}: {cell!r} names no setting"
                names += [(row[0], n) for n in found]
    # main, speed, Wanda's two rules, allocation/DSnoT, DSnoT variants, exact DSnoT, DSnoT on a shrunk XᵀX,
    # DSnoT's default (MLP only), SliceGPT, structured, MaskLLM, reconstruction, reconstruction after other
    # masks, SparseGPT's refit
    assert tables_with_names == 14, tables_with_names
    return names


def test_every_results_row_names_an_existing_setting(benchmark):
    names = named_settings()
    assert len(names) > 60
    missing = sorted({(row, n) for row, n in names if n not in benchmark.SETTINGS})
    assert not missing, missing


def test_every_setting_and_group_is_valid(benchmark):
    for name, stages in benchmark.SETTINGS.items():
        if stages is not None:
            recipe_from_dict({"stages": stages}, name)
    for group, names in benchmark.GROUPS.items():
        assert set(names) <= set(benchmark.SETTINGS), group


def test_dsnot_variants_say_how_they_ran(benchmark):
    """The DSnoT variant rows ran before `verify` became the default: their settings say verify: false,
    so that they reproduce now; the verify rows and the defaults say or imply true."""
    for name, stages in benchmark.SETTINGS.items():
        refine = next((s["refine"] for s in stages or [] if "refine" in s), None)
        if refine is None or "(" not in name or refine.get("criterion") == "exact":  # exact swaps: no verify step
            continue
        verify = recipe_from_dict({"stages": stages}).stages[-1].spec.verify
        assert verify == ("verify" in name), name
