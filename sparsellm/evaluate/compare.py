"""`sparsellm compare RUN_DIR...`: several runs side by side: a table, and perplexity / accuracy
against how much was removed, one curve per method (runs sorted by that amount).

x is the achieved sparsity of the decoder Linear weights for pruned runs; for runs with a slice or
structure stage it is the fraction of the dense model's parameters removed, 1 - parameters / parameters before
(negative when SliceGPT's untied head and shortcuts make the model larger)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .report import _img, _num, _png, _pyplot, _table, describe, page, shapes_changed
from .schema import validate


def load_run(folder: str | Path) -> dict:
    path = Path(folder) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no report.json in {folder}; give output folders of sparsellm prune") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); give output folders of sparsellm prune") from None
    if report.get("schema_version") != 3:
        raise DataError(f"{path} has report schema {report.get('schema_version')}, not 3; regenerate it with this "
                        "version of sparsellm prune")
    validate(report)
    return report


def family(r: dict) -> str:
    """Runs of one family differ only in how much they remove: the curve they share."""
    return describe(r, amounts=False)


def removed(r: dict) -> float:
    m = r["model"]
    if shapes_changed(r):
        return 1 - m["parameters"] / m["parameters_before"]
    return r["sparsity"]["overall"]


def summarize(folders: list[str | Path]) -> dict:
    runs = []
    for f in folders:
        r = load_run(f)
        zs, ppl = r.get("zeroshot") or {}, r.get("perplexity") or {}
        runs.append({"run": Path(f).name, "path": str(f), "compression": describe(r), "family": family(r),
                     "x": removed(r), "structured": shapes_changed(r),
                     "sparsity": r["sparsity"]["overall"], "parameters": r["model"]["parameters"],
                     "parameters_before": r["model"]["parameters_before"], "disk_bytes": r["model"].get("disk_bytes"),
                     "perplexity": ppl.get("after") or {}, "perplexity_before": ppl.get("before") or {},
                     "seqlen": ppl.get("seqlen"),
                     "accuracy": {t: v.get("acc") for t, v in (zs.get("after") or {}).items()},
                     "accuracy_before": {t: v.get("acc") for t, v in (zs.get("before") or {}).items()},
                     "mean_acc": zs.get("mean_acc_after"), "mean_acc_before": zs.get("mean_acc_before"),
                     "speed": {k: {"prefill": v["prefill_tokens_per_s"], "decode": v["decode_tokens_per_s"]}
                               for k, v in (r.get("speed") or {}).items() if isinstance(v, dict)} or None,
                     "model": r["model"]["spec"]})
    return {"runs": runs, "datasets": sorted({d for x in runs for d in x["perplexity"]}),
            "tasks": sorted({t for x in runs for t in x["accuracy"]})}


def _first(values):
    return next((v for v in values if v is not None), None)


def curves(summary: dict, metric: str) -> bytes | None:
    """metric "perplexity": one panel per dataset (log scale); "accuracy": mean accuracy and each task."""
    runs = summary["runs"]
    if metric == "perplexity":
        panels = [(f"perplexity {Path(d).name}", lambda x, d=d: x["perplexity"].get(d),
                   _first(x["perplexity_before"].get(d) for x in runs)) for d in summary["datasets"]]
    else:
        panels = [("mean accuracy" if len(summary["tasks"]) > 1 else f"accuracy {summary['tasks'][0]}",
                   lambda x: x["mean_acc"] if len(summary["tasks"]) > 1 else x["accuracy"].get(summary["tasks"][0]),
                   _first(x["mean_acc_before"] if len(summary["tasks"]) > 1
                          else x["accuracy_before"].get(summary["tasks"][0]) for x in runs))] if summary["tasks"] else []
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.0), dpi=100, squeeze=False)
    families = list(dict.fromkeys(x["family"] for x in runs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, get, dense) in zip(axes[0], panels):
        values = [v for v in [dense] + [get(x) for x in runs] if v is not None]
        labels = []
        for k, fam in enumerate(families):
            pts = sorted((x["x"], get(x), x["structured"], x["run"]) for x in runs if x["family"] == fam and get(x) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if pts[0][2] else "o",
                        color=colors[k % len(colors)], label=fam)
                labels += [(px, py, name) for px, py, _, name in pts]
        if dense is not None:
            ax.axhline(dense, color="k", linestyle="--", linewidth=1, label=f"dense {dense:.3g}")
            ax.plot([0], [dense], "k*", markersize=9)
        if metric == "perplexity" and max(values) / min(values) > 20:
            ax.set_yscale("log")
        elif metric == "accuracy":
            ax.set_ylim(0, 1)
        xs = [x["x"] for x in runs]
        ax.set_xlim(min(0.0, *xs) - 0.05, max(xs) + 0.1)
        for (px, py, name), dy in zip(labels, _label_offsets(ax, labels)):
            ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, dy), fontsize=7)
        ax.set_xlabel("sparsity (pruned, ●) / parameters removed (sliced or structured, ■)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _png(fig)


def _label_offsets(ax, labels: list, height: float = 9.0, width: float = 60.0) -> list[float]:
    """Vertical offsets (points) of the point labels: a label that would cover an earlier one (runs at
    the same sparsity with close values) moves down a line until it is clear."""
    ax.get_ylim()  # settles autoscaling, so that data -> display is final
    scale = ax.figure.dpi / 72
    placed, out = [], []
    for x, y in ax.transData.transform([(px, py) for px, py, _ in labels]) if labels else []:
        off = 4.0
        while any(abs(x - qx) < width * scale and abs(y + off * scale - qy) < height * scale for qx, qy in placed):
            off -= height
        placed.append((x, y + off * scale))
        out.append(off)
    return out


def table(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["run", "compression", "x", "parameters"] + [f"ppl {Path(d).name}" for d in summary["datasets"]]
    header += [f"acc {t}" for t in summary["tasks"]] + (["mean acc"] if len(summary["tasks"]) > 1 else [])
    header += ["decode tok/s vs dense"]
    rows = []
    for x in sorted(summary["runs"], key=lambda x: (x["family"], x["x"])):
        row = [x["run"], x["compression"], f"{x['x']:.4f}", f"{x['parameters']:,}"]
        row += [_num(x["perplexity"].get(d)) for d in summary["datasets"]]
        row += [_num(x["accuracy"].get(t), ".4f") for t in summary["tasks"]]
        row += [_num(x["mean_acc"], ".4f")] if len(summary["tasks"]) > 1 else []
        sp = x["speed"]
        row.append(f"{sp['compressed']['decode']:.1f} / {sp['dense']['decode']:.1f}" if sp else "n/a")
        rows.append(row)
    return header, rows


def render_markdown(summary: dict) -> str:
    header, rows = table(summary)
    lines = ["# sparsellm compare", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "x: achieved sparsity of the decoder Linear weights (pruned runs) or fraction of parameters removed "
              "(runs with a slice or structure stage).", ""]
    return "\n".join(lines)


def render_html(summary: dict) -> str:
    header, rows = table(summary)
    body = ["<h1>sparsellm compare</h1>",
            f"<p class=\"sub\">{len(summary['runs'])} runs of {', '.join(sorted({x['model'] for x in summary['runs']}))}</p>",
            _table(header, rows),
            "<p class=\"sub\">x: achieved sparsity of the decoder Linear weights (pruned runs) or fraction of parameters "
            "removed (runs with a slice or structure stage); dashed line: the dense model.</p>",
            "<h2>Perplexity against sparsity</h2>", _img(curves(summary, "perplexity"), "perplexity vs sparsity"),
            "<h2>Accuracy against sparsity</h2>", _img(curves(summary, "accuracy"), "accuracy vs sparsity")]
    return page("sparsellm compare", "\n".join(body))


def write_compare(folders: list, output: str | Path) -> dict:
    """Writes OUTPUT (.html) plus the .md and .json beside it; returns the summary."""
    summary = summarize(folders)
    out = Path(output)
    stem = out.with_suffix("") if out.suffix in (".html", ".md", ".json") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(render_markdown(summary), encoding="utf-8")
    stem.with_suffix(".html").write_text(render_html(summary), encoding="utf-8")
    return summary
