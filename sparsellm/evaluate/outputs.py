"""The report data, written once as report.json and rendered from it: report.md, report.html, the
per-layer chart and the model card (README.md)."""
from __future__ import annotations

import json
from pathlib import Path

from .card import write_card
from .report import plot_layer_sparsity, render_html, render_markdown


def write_report(folder: Path, report: dict, name: str | None = None) -> None:
    """report.json, then everything derived from it: report.md, report.html, README.md (model card)."""
    folder = Path(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    if report.get("zeroshot"):
        from .zeroshot import write_lm_eval_results

        write_lm_eval_results(folder, report)
    write_derived(folder, report, name or folder.name)


def write_derived(folder: Path, report: dict, name: str, repo_id: str | None = None) -> None:
    (folder / "report.md").write_text(render_markdown(report), encoding="utf-8")
    (folder / "report.html").write_text(render_html(report), encoding="utf-8")
    if report.get("allocation"):
        plot_layer_sparsity(report, folder / "sparsity_per_layer.png")
    write_card(folder, report, name, repo_id)
