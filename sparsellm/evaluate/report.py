"""What one compression run cost and bought, for machines and people: report.json (schema in
schema.py), report.md, report.html (self-contained: inline CSS, plots as embedded PNGs) and the
model card README.md. All but report.json are derived from it (`sparsellm report OUT_DIR` rewrites them)."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path



def _mib(b: int | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:,.0f} MiB" if b >= 10 * 2**20 else f"{b / 2**20:.2f} MiB"


def _num(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _ratio(before, after) -> str:
    return f"{after / before:.2f}×" if before and after is not None else ""


def describe(r: dict, amounts: bool = True) -> str:
    """One line naming the compression, e.g. 'wanda 2:4' or 'slicegpt 0.2 (uniform) + wanda 2:4'; without
    amounts ('wanda', 'slicegpt (uniform)') it names the family of runs that share a curve in compare."""
    parts = []
    for s in r["stages"]:
        st = s["settings"]
        if s["kind"] == "slice":
            parts.append(f"{s['method']}{' ' + str(st['slicing']) if amounts else ''} ({st['rotation']})")
        elif s["kind"] == "prune":
            nm = st["pattern"] != "unstructured"
            amount = st["pattern"] if nm else str(st["sparsity"]) if amounts else ""
            parts.append(f"{s['method']} {amount}".rstrip())
        else:
            parts.append(s["method"])
    return " + ".join(parts)


def export_note(r: dict) -> str:
    """What the weights' size means, where it is not a plain dense export in the dtype the run computed in:
    ' (bfloat16)', ' (sparse-bitmask, float32: 0.62× a dense float32 export)'."""
    ex, m = r.get("export") or {}, r["model"]
    dtype, fmt, dense = ex.get("dtype"), ex.get("format") or "dense", ex.get("dense_bytes")
    if dtype is None or (dtype == m["dtype"] and fmt == "dense"):
        return ""
    if fmt == "dense" or not dense:
        return f" ({dtype})" if fmt == "dense" else f" ({fmt}, {dtype})"
    return f" ({fmt}, {dtype}: {ex['weights_bytes'] / dense:.2f}× a dense {dtype} export)"


def metric_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, after/before) for the before/after table."""
    m = r["model"]
    rows = [("parameters", f"{m['parameters_before']:,}", f"{m['parameters']:,}", _ratio(m["parameters_before"], m["parameters"])),
            ("non-zero parameters", _num(m["nonzero_parameters_before"], ","), _num(m["nonzero_parameters"], ","),
             _ratio(m["nonzero_parameters_before"], m["nonzero_parameters"])),
            ("decoder Linear sparsity", _num(r["sparsity"].get("overall_before"), ".4f"), f"{r['sparsity']['overall']:.4f}", "")]
    if m.get("disk_bytes") is not None:
        rows.append(("weights on disk", _mib(m.get("source_disk_bytes")) + (" (source)" if m.get("source_disk_bytes") else ""),
                     _mib(m["disk_bytes"]) + export_note(r), ""))
    ppl = r.get("perplexity") or {}
    for ds, after in (ppl.get("after") or {}).items():
        before = (ppl.get("before") or {}).get(ds)
        rows.append((f"perplexity {Path(ds).name} (seqlen {ppl['seqlen']})", _num(before), _num(after), _ratio(before, after)))
    zs = r.get("zeroshot") or {}
    for task, res in (zs.get("after") or {}).items():
        before = (zs.get("before") or {}).get(task, {}).get("acc")
        chat = ", chat template" if zs.get("apply_chat_template") else ""
        rows.append((f"accuracy {task} (n={res['samples']}{chat})", _num(before, ".4f"), _num(res.get("acc"), ".4f"), ""))
    if zs.get("after") and len(zs["after"]) > 1:
        rows.append(("mean accuracy", _num(zs.get("mean_acc_before"), ".4f"), _num(zs.get("mean_acc_after"), ".4f"), ""))
    sp = r.get("speed")
    if sp:
        for key, label in (("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s")):
            d, c = sp["dense"][key], sp["compressed"][key]
            rows.append((label, f"{d:,.1f}", f"{c:,.1f}", _ratio(d, c)))
    return rows


def render_markdown(r: dict) -> str:
    lines = [f"# sparsellm report: {r['model']['spec']}", "", f"Compression: **{describe(r)}**", "",
             "| metric | before | after | after / before |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in metric_rows(r)]
    lines += ["", "| stage | method | settings | seconds | peak RSS |", "|---|---|---|---|---|"]
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
        if "intermediate_size" in d:
            (p0, p1), ffn, heads = d["parameters"], d["intermediate_size"], d["heads"]
            how = ("one width in every layer, a stock architecture (loads without custom code)" if d["stock_architecture"]
                   else "per-layer widths: loads with trust_remote_code=True (modeling_sliced.py) or sparsellm")
            lines += [f"Structured {st['method']}: FFN channels per layer {min(ffn)}–{max(ffn)}, attention heads "
                      f"{min(heads)}–{max(heads)}, parameters {p0:,} → {p1:,} ({p1 / p0:.1%}); {how}.", "",
                      "| layer | FFN channels | heads |", "|---|---|---|"]
            lines += [f"| {i} | {f} | {h} |" for i, (f, h) in enumerate(zip(ffn, heads))] + [""]
        if "expert_tokens" in d:
            free = d["experts_data_free"]
            lines += [f"Mixture of experts: each expert pruned from the calibration tokens the router sent it; "
                      f"{len(free)} expert matrices (experts under {d['min_expert_tokens']} tokens) by a data-free score "
                      f"(magnitude){': ' + ', '.join(free[:12]) if free else ''}"
                      f"{f' and {len(free) - 12} more (report.json)' if len(free) > 12 else ''}.", "",
                      "| experts | tokens per expert |", "|---|---|"]
            lines += [f"| {m} | {' '.join(map(str, t))} |" for m, t in d["expert_tokens"].items()] + [""]
        if "ranks" in d:
            lines += [f"LoRA recovery: {d['steps']} steps, {d['tokens']:,} tokens, {d['seconds']:.1f} s, loss "
                      f"{d['loss_first']:.3f} → {d['loss_mean_last10']:.3f} (mean of the last 10 steps), ranks per block "
                      f"{min(d['ranks'])}–{max(d['ranks'])}, merged into the weights.", ""]
        if "changed_from_prior" in d:
            per = f", {d['seconds_per_step']:.1f} s a step" if d.get("seconds_per_step") else ""
            lines += [f"MaskLLM: {d['steps']} steps, {d['tokens']:,} training tokens{per}, prior {d['prior']}; "
                      f"{d['changed_from_prior']:.2%} of the groups ended on another pattern than they started on; "
                      "the learned masks alone are in masks.safetensors (sparsellm apply-masks).", ""]
    zs = r.get("zeroshot")
    if zs:
        lines += [f"lm-eval: {zs['num_fewshot'] if zs['num_fewshot'] is not None else 'default'}-shot, "
                  f"limit {zs['limit'] or 'none'}, batch size {zs['batch_size']}"
                  f" (lm-eval {r['versions'].get('lm_eval')}).", ""]
    sp = r.get("speed")
    if sp:
        c = sp["compressed"]
        lines += [f"Speed: prefill = one forward over {c['prefill_tokens']} tokens, decode = {c['decode_tokens']} "
                  f"greedy steps after a {c['decode_prompt']}-token prompt, batch 1, median of {c['repeats']} repeats, "
                  f"{c['device']}, {c['threads']} threads, dense and compressed "
                  f"{'interleaved in one process' if sp['interleaved'] else 'measured one after the other'}.", ""]
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
        lines += ["## Sparsity per decoder layer", "", "| layer | sparsity | weights removed |", "|---|---|---|"]
        lines += [f"| {p['layer']} | {p['sparsity']:.4f} | {_num(p.get('removed'), '.4f')} |" for p in r["sparsity"]["per_layer"]]
    v = r["versions"]
    lines += ["", f"sparsellm {v['sparsellm']}, torch {v['torch']}, transformers {v['transformers']}, python {v['python']}"
              + (f", lm-eval {v['lm_eval']}" if v.get("lm_eval") else ""), ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    # no Software/date metadata, so that the same run writes the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def shapes_changed(report: dict) -> bool:
    """Whether a stage deleted rows and columns (slice, structure), so that what was removed is counted
    in parameters rather than zeros (model.sliced is false for uniform slicing and equal widths, which
    are stock architectures)."""
    return any(st["kind"] in ("slice", "structure") for st in report.get("stages", []))


def layer_chart(report: dict) -> bytes:
    """Bars: fraction of each decoder layer's Linear weights removed (= sparsity when pruned; what
    slicing deleted counts too), with an allocation's per-layer targets when there was one."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    per_layer = report["sparsity"]["per_layer"]
    alloc = report.get("allocation")
    x = [p["layer"] for p in per_layer]
    y = [p["removed"] if p.get("removed") is not None else p["sparsity"] for p in per_layer]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(x)), 3.5), dpi=100)
    shaped = shapes_changed(report)  # the bars count deleted rows and columns, not zeros
    ax.bar(x, y, color="#4C72B0", label="weights removed" if shaped else "achieved")
    lo = min(y)
    if alloc:
        ax.plot(x, alloc["sparsity"], "o", color="#DD8452", markersize=4, label=f"allocated ({alloc['method']})")
        ax.axhline(alloc["target"], color="k", linestyle="--", linewidth=1, label=f"target {alloc['target']:.2f}")
        lo = min(lo, min(alloc["sparsity"]))
    ax.set_xlabel("decoder layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fraction of Linear weights removed" if shaped else "sparsity")
    ax.set_ylim(max(0.0, lo - 0.1) if alloc else 0.0, 1.0)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def plot_layer_sparsity(report: dict, path: Path) -> None:
    Path(path).write_bytes(layer_chart(report))


def metrics_chart(report: dict) -> bytes | None:
    """Grouped bars, before vs after: perplexity per dataset (log scale) and accuracy per task."""
    ppl = report.get("perplexity") or {}
    zs = report.get("zeroshot") or {}
    panels = []
    if ppl.get("after"):
        panels.append(("perplexity (lower is better)", [Path(d).name for d in ppl["after"]],
                       [ppl.get("before", {}).get(d) for d in ppl["after"]], list(ppl["after"].values()), True))
    if zs.get("after"):
        panels.append(("accuracy (higher is better)", list(zs["after"]),
                       [zs.get("before", {}).get(t, {}).get("acc") for t in zs["after"]],
                       [v.get("acc") for v in zs["after"].values()], False))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.5), dpi=100, squeeze=False)
    for ax, (title, names, before, after, log) in zip(axes[0], panels):
        xs = range(len(names))
        w = 0.38
        ax.bar([i - w / 2 for i in xs], [b or 0 for b in before], w, color="#8C8C8C", label="before")
        ax.bar([i + w / 2 for i in xs], [a or 0 for a in after], w, color="#C44E52", label="after")
        for i, a in zip(xs, after):
            if a is not None:
                ax.annotate(f"{a:.3g}", (i + w / 2, a), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), names, rotation=20 if len(names) > 3 else 0, fontsize=8)
        ax.set_title(title, fontsize=10)
        vals = [v for v in before + after if v]
        if not log:  # accuracy
            ax.set_ylim(0, 1)
        elif vals and max(vals) / min(vals) > 20:  # e.g. 30 -> 2000 after 2:4 magnitude pruning
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    return _png(fig)


CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin-top:0}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#f5f7fa;border:1px solid #dde3ea;border-radius:6px;padding:10px 14px;min-width:150px}
.card .v{font-size:20px;font-weight:600}.card .k{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f0f2f5}td:first-child,th:first-child{text-align:left}img{max-width:100%}
details{margin:8px 0}code,pre{background:#f5f5f5;font-size:12px}pre{padding:8px;overflow-x:auto}
"""


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def render_html(r: dict) -> str:
    m, ppl, zs, sp = r["model"], r.get("perplexity") or {}, r.get("zeroshot") or {}, r.get("speed")
    cards = [("compression", describe(r)), ("decoder Linear sparsity", f"{r['sparsity']['overall']:.4f}"),
             ("parameters", f"{m['parameters'] / 1e6:,.1f} M ({_ratio(m['parameters_before'], m['parameters'])})")]
    for ds, after in (ppl.get("after") or {}).items():
        before = (ppl.get("before") or {}).get(ds)
        cards.append((f"perplexity {Path(ds).name}", f"{_num(before, '.2f')} → {after:.2f}"))
    if zs.get("after"):
        cards.append(("mean accuracy", f"{_num(zs.get('mean_acc_before'), '.3f')} → {_num(zs.get('mean_acc_after'), '.3f')}"))
    if sp:
        cards.append(("decode speed", _ratio(sp["dense"]["decode_tokens_per_s"], sp["compressed"]["decode_tokens_per_s"])))
    body = [f"<h1>sparsellm report: {html.escape(m['spec'])}</h1>",
            f"<p class=\"sub\">{html.escape(m['model_type'])}, {html.escape(m['dtype'])}, device {html.escape(r['device'])}"
            f"; schema {r['schema_version']}</p>",
            "<div class=\"cards\">" + "".join(f"<div class=\"card\"><div class=\"v\">{html.escape(v)}</div>"
                                              f"<div class=\"k\">{html.escape(k)}</div></div>" for k, v in cards) + "</div>",
            "<h2>Before and after</h2>", _table(["metric", "before", "after", "after / before"], metric_rows(r)),
            _img(metrics_chart(r), "before/after metrics"),
            "<h2>Per decoder layer</h2>", _img(layer_chart(r), "per-layer sparsity")]
    if sp:
        c = sp["compressed"]
        body.append(f"<p>Speed: prefill over {c['prefill_tokens']} tokens, {c['decode_tokens']} decode steps, median of "
                    f"{c['repeats']} repeats on {html.escape(c['device'])} ({c['threads']} threads), dense and compressed "
                    f"{'interleaved' if sp['interleaved'] else 'sequential'}.</p>")
    stages = []
    for s in r["stages"]:
        settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items() if k not in ("method",) and v not in (None, []))
        stages.append([s["kind"], s["method"], settings, f"{s['seconds']:.1f}", _mib(s["peak_rss_bytes"])])
    body += ["<h2>Stages</h2>", _table(["stage", "method", "settings", "seconds", "peak RSS"], stages),
             "<h2>Wall time</h2>", _table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in r["timings"].items()]),
             f"<p>Peak resident memory {_mib(r['memory']['peak_rss_bytes'])}.</p>",
             "<details><summary>Per-layer table</summary>",
             _table(["layer", "sparsity", "weights removed", "Linear weights"],
                    [[p["layer"], f"{p['sparsity']:.4f}", _num(p.get("removed"), ".4f"), f"{p['params']:,}"]
                     for p in r["sparsity"]["per_layer"]]), "</details>",
             "<details><summary>Recipe</summary><pre>" + html.escape(json.dumps(r["recipe"], indent=2)) + "</pre></details>"]
    v = r["versions"]
    body.append("<p class=\"sub\">" + html.escape(", ".join(f"{k} {val}" for k, val in v.items() if val)) + "</p>")
    return page(f"sparsellm report: {m['spec']}", "\n".join(body))
