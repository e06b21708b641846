"""report.json (machine-readable) and report.md (for people) describing one compression run."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..loading.adapters import Adapter


@torch.no_grad()
def layer_zeros(layer: nn.Module) -> dict[str, tuple[int, int]]:
    """(exact zeros, weights) of each Linear weight in a decoder layer."""
    return {name: (int((mod.weight == 0).sum()), mod.weight.numel())
            for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def sparsity_summary(model: nn.Module, adapter: Adapter, zeros: list[dict[str, tuple[int, int]]] | None = None) -> dict:
    """Fraction of exact zeros in the Linear weights of the decoder layers, overall/per layer/per module.
    `zeros`: layer_zeros of every decoder layer, counted earlier (a low-memory run's layers are on disk)."""
    if zeros is None:
        zeros = [layer_zeros(layer) for layer in adapter.layers(model)]
    per_layer, per_module = [], {}
    total_zero = total = 0
    for i, counts in enumerate(zeros):
        lz = ln = 0
        for name, (z, n) in counts.items():
            per_module[f"{adapter.layer_prefix(i)}.{name}"] = z / n
            lz, ln = lz + z, ln + n
        per_layer.append({"layer": i, "sparsity": lz / ln if ln else 0.0, "params": ln})
        total_zero, total = total_zero + lz, total + ln
    return {"overall": total_zero / total if total else 0.0, "params": total,
            "per_layer": per_layer, "per_module": per_module}


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


def render_markdown(r: dict) -> str:
    lines = [f"# sparsellm report: {r['model']['spec']}", ""]
    lines += ["| stage | method | settings | seconds | peak RSS |", "|---|---|---|---|---|"]
    for s in r["stages"]:
        settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items() if k not in ("method", "targets", "ignore") and v not in (None, []))
        lines.append(f"| {s['kind']} | {s['method']} | {settings} | {s['seconds']:.1f} | {_mib(s['peak_rss_bytes'])} |")
    lines += ["", f"Achieved sparsity of decoder Linear weights: **{r['sparsity']['overall']:.4f}** "
              f"({r['sparsity']['params']:,} parameters)", ""]
    for st in r["stages"]:
        d = st.get("details") or {}
        if "hidden_size" in d:
            (h0, h1), (p0, p1) = d["hidden_size"], d["parameters"]
            how = ("a stock architecture (loads without custom code)" if d["stock_architecture"] else
                   "per-layer shapes: loads with trust_remote_code=True (modeling_sliced.py) or sparsellm")
            lines += [f"SliceGPT ({st['settings']['rotation']}): hidden size {h0} → {h1}, parameters {p0:,} → {p1:,} "
                      f"({p1 / p0:.1%}); {how}.", ""]
    ppl = r.get("perplexity") or {}
    if ppl.get("after"):
        lines += [f"## Perplexity (seqlen {ppl['seqlen']})", "", "| dataset | before | after |", "|---|---|---|"]
        for ds, after in ppl["after"].items():
            before = ppl.get("before", {}).get(ds)
            lines.append(f"| {ds} | {'n/a' if before is None else f'{before:.3f}'} | {after:.3f} |")
        lines.append("")
    lines += ["## Wall time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["timings"].items()]
    lines += ["", f"Peak resident memory: {_mib(r['memory']['peak_rss_bytes'])}"
              f" (after loading: {_mib(r['memory']['rss_after_load_bytes'])})", ""]
    alloc = r.get("allocation")
    if alloc:
        extra = [k for k in ("outlier_ratio", "importance") if k in alloc]
        lines += [f"## Sparsity per decoder layer ({alloc['method']} allocation, target {alloc['target']:.4f}, "
                  f"allocated overall {alloc['realized']:.4f})", "",
                  "![sparsity per layer](sparsity_per_layer.png)", "",
                  "| layer | allocated | achieved | " + " | ".join(k.replace("_", " ") for k in extra) + " |",
                  "|---|---|---|" + "---|" * len(extra)]
        for p in r["sparsity"]["per_layer"]:
            i = p["layer"]
            cells = " | ".join(f"{alloc[k][i]:.4g}" for k in extra)
            lines.append(f"| {i} | {alloc['sparsity'][i]:.4f} | {p['sparsity']:.4f} | {cells} |")
    else:
        lines += ["## Sparsity per decoder layer", "", "| layer | sparsity |", "|---|---|"]
        lines += [f"| {p['layer']} | {p['sparsity']:.4f} |" for p in r["sparsity"]["per_layer"]]
    v = r["versions"]
    lines += ["", f"sparsellm {v['sparsellm']}, torch {v['torch']}, transformers {v['transformers']}, python {v['python']}", ""]
    return "\n".join(lines)


def plot_layer_sparsity(report: dict, path: Path) -> None:
    """Bar chart of achieved sparsity per decoder layer, with the allocation and the overall target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer = report["sparsity"]["per_layer"]
    alloc = report["allocation"]
    x = [p["layer"] for p in per_layer]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(x)), 3.5), dpi=100)
    ax.bar(x, [p["sparsity"] for p in per_layer], color="#4C72B0", label="achieved")
    ax.plot(x, alloc["sparsity"], "o", color="#DD8452", markersize=4, label=f"allocated ({alloc['method']})")
    ax.axhline(alloc["target"], color="k", linestyle="--", linewidth=1, label=f"target {alloc['target']:.2f}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity")
    lo = min(min(alloc["sparsity"]), min(p["sparsity"] for p in per_layer))
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    # fixed metadata so that the same run writes the same bytes
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def write_report(folder: Path, report: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(render_markdown(report), encoding="utf-8")
    if report.get("allocation"):
        plot_layer_sparsity(report, folder / "sparsity_per_layer.png")
