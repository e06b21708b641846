#!/usr/bin/env python
"""GPU check for the layer-wise methods: the same recipes on cuda and cpu (tiny Llama, tests/data),
and DSnoT's cost on Llama-7B-sized matrices against Wanda's mask on the same device.

    python scripts/gpu_check.py OUT.json"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import TEXT, _train_tokenizer, tiny_model  # noqa: E402
from sparsellm.compress.dsnot import dsnot_exact, dsnot_refine, shrunk  # noqa: E402
from sparsellm.compress.wanda import wanda_mask  # noqa: E402
from sparsellm.pipeline import RunOptions, compress  # noqa: E402
from sparsellm.recipe import recipe_from_dict  # noqa: E402

DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu", "cpu")  # cpu twice: a dry run here
RECIPES = {
    "wanda60+dsnot": [{"prune": {"method": "wanda", "sparsity": 0.6}}, {"refine": {"method": "dsnot"}}],
    "sparsegpt2:4+dsnot": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}, {"refine": {"method": "dsnot", "criterion": "mse"}}],
    "owl+wanda70+dsnot": [{"allocate": {"method": "owl"}}, {"prune": {"method": "wanda", "sparsity": 0.7}}, {"refine": {"method": "dsnot"}}],
    "ecoflap+wanda60": [{"allocate": {"method": "ecoflap", "nsamples": 2}}, {"prune": {"method": "wanda", "sparsity": 0.6}}],
}


def pipelines(tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    tok = _train_tokenizer()
    tiny_model("llama").save_pretrained(tmp / "m")
    tok.save_pretrained(tmp / "m")
    out = {}
    for name, stages in RECIPES.items():
        recipe = recipe_from_dict({"seed": 0, "calibration": {"dataset": str(TEXT), "nsamples": 8, "seqlen": 64, "batch_size": 4},
                                   "evaluation": {"ppl": [str(TEXT)], "seqlen": 64, "limit": 8, "before": False}, "stages": stages})
        reps, models = {}, {}
        for dev in DEVICES:
            t = time.perf_counter()
            reps[dev] = compress(recipe, tmp / f"{name}-{dev}", RunOptions(device=dev, overwrite=True), str(tmp / "m"))
            reps[dev]["wall"] = time.perf_counter() - t
            models[dev] = AutoModelForCausalLM.from_pretrained(tmp / f"{name}-{dev}")
        if "cuda" not in reps:
            reps["cuda"], models["cuda"] = reps["cpu"], models["cpu"]
        same_mask = total = 0
        rows_equal = True
        for (n, a), (_, b) in zip(models["cpu"].named_parameters(), models["cuda"].named_parameters()):
            if n.endswith("proj.weight"):
                same_mask += int(((a == 0) == (b == 0)).sum())
                total += a.numel()
                rows_equal &= bool(torch.equal((a == 0).sum(1), (b == 0).sum(1)))
        ppl = {d: next(iter(reps[d]["perplexity"]["after"].values())) for d in reps}
        out[name] = {"ppl": ppl, "sparsity": {d: reps[d]["sparsity"]["overall"] for d in reps},
                     "mask_agreement": same_mask / total, "row_counts_equal": rows_equal,
                     "allocation": {d: (reps[d]["allocation"] or {}).get("sparsity") for d in reps},
                     "wall_s": {d: reps[d]["wall"] for d in reps}}
        print(name, json.dumps(out[name]), flush=True)
    return out


def dsnot_speed(dev: str = "cuda", shapes=((4096, 11008), (11008, 4096), (4096, 4096))) -> dict:
    out = {}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    for rows, cols in shapes:
        D = torch.randn(rows, cols, device=dev, generator=g)
        X = torch.randn(2048, cols, device=dev, generator=g) * torch.rand(cols, device=dev, generator=g) + 0.3
        mean, var, sq = X.mean(0), X.var(0, unbiased=False), (X * X).mean(0)
        for label, sparsity, nm in (("60%", 0.6, None), ("2:4", 0.5, (2, 4))):
            def wanda():
                return D.masked_fill(wanda_mask(D, sq, sparsity, nm), 0)
            W = wanda()
            times, res = {}, {}
            H = X.T @ X
            Hs = shrunk(H, 0.5)
            for key, fn in (("wanda_mask", wanda), ("dsnot", lambda: dsnot_refine(D, W, mean * 2048, var, sq, nm[1] if nm else None)),
                            ("dsnot_exact", lambda: dsnot_exact(D, W, Hs, nm[1] if nm else None, check=H))):
                if key == "wanda_mask":
                    fn()  # warm-up (the kernels' first launch)
                sync()
                t = time.perf_counter()
                res[key] = fn()
                sync()
                times[key] = time.perf_counter() - t
            r, e = res["dsnot"], res["dsnot_exact"]
            out[f"{rows}x{cols} {label}"] = {**times, "swaps": r.swaps, "cycles": r.cycles,
                                            "exact_swaps": e.swaps, "exact_cycles": e.cycles,
                                            "exact_row_zeros_equal": bool(torch.equal((e.weight == 0).sum(1), (W == 0).sum(1))),
                                            "exact_err": [float(e.error_before.mean()), float(e.error_after.mean())],
                                            "row_zeros_equal": bool(torch.equal((r.weight == 0).sum(1), (W == 0).sum(1))),
                                            "mean_abs_err": [float(r.error_before.abs().mean()), float(r.error_after.abs().mean())]}
            print(f"{rows}x{cols} {label}", json.dumps(out[f"{rows}x{cols} {label}"]), flush=True)
    return out


if __name__ == "__main__":
    cuda = torch.cuda.is_available()
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        result["pipelines"] = pipelines(Path(tmp))
    if cuda:
        result["dsnot_speed"] = dsnot_speed()
    Path(sys.argv[1]).write_text(json.dumps(result, indent=2))
