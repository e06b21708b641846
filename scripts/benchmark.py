#!/usr/bin/env python
"""The quality benchmark of docs/benchmarks.md (its protocol) for the pruning methods of sparsellm.

SmolLM2-135M-Instruct (GGUF, dequantized to fp32), 2 threads, 32 calibration windows of 512 tokens
from lee_calib.txt (random.seed(0)), perplexity on non-overlapping 512-token chunks of lee_eval.txt.
Each setting runs in a fresh worker process so its peak RSS is its own. Prints one markdown table.

    .venv/bin/python scripts/benchmark.py [--data data] [--only wanda-50,dense] [--json out.json]

Every results row of the README and docs/benchmarks.md names the setting (or group) that produced it;
tests/test_benchmark_settings.py checks that each name exists here.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def _p(method, s):
    return {"method": method, "pattern": s} if ":" in str(s) else {"method": method, "sparsity": s}


def _tag(s):
    """A setting name's suffix: the N:M pattern as written, or the sparsity in percent (0.6 -> 60)."""
    return s if ":" in str(s) else int(s * 100)


SETTINGS: dict[str, list | None] = {"dense": None}
for _m in ("magnitude", "wanda", "sparsegpt"):
    for _s in (0.5, "2:4", "4:8"):
        SETTINGS[f"{_m}-{_tag(_s)}"] = [{"prune": _p(_m, _s)}]
# layer-wise allocation and DSnoT (issue 3): 60 %, 70 % unstructured and 2:4
MSE = {"refine": {"method": "dsnot", "criterion": "mse", "modules": "all"}}  # issue 3's DSnoT: the defaults (mse + verify), spelled out
for _s in (0.6, 0.7, "2:4"):
    tag = _tag(_s)
    SETTINGS[f"wanda-{tag}"] = [{"prune": _p("wanda", _s)}]
    SETTINGS[f"wanda+dsnot-{tag}"] = [{"prune": _p("wanda", _s)}, MSE]
    SETTINGS[f"sparsegpt-{tag}"] = [{"prune": _p("sparsegpt", _s)}]
    SETTINGS[f"sparsegpt+dsnot-{tag}"] = [{"prune": _p("sparsegpt", _s)}, MSE]
    SETTINGS[f"owl+wanda-{tag}"] = [{"allocate": {"method": "owl"}}, {"prune": _p("wanda", _s)}]
    SETTINGS[f"owl+wanda+dsnot-{tag}"] = [{"allocate": {"method": "owl"}}, {"prune": _p("wanda", _s)}, MSE]
    # 4 windows x 2 directions per layer (the recipe default is 8 x 2): the estimate is the costly part on CPU
    SETTINGS[f"ecoflap+wanda-{tag}"] = [{"allocate": {"method": "ecoflap", "nsamples": 4}}, {"prune": _p("wanda", _s)}]
# How the DSnoT defaults were chosen (README, "How the DSnoT defaults were chosen"): the variants ran before
# `verify` became the default, so every variant without "verify" in its name says verify: false.
def _dsnot(criterion: str, modules: str, verify: bool = False, **kw) -> dict:
    return {"refine": {"method": "dsnot", "criterion": criterion, "modules": modules, "verify": verify, **kw}}


# which layers DSnoT should refine (the reference skips the MLP by default); the paper's rule ("mean")
SETTINGS["wanda+dsnot(attn)-60"] = [{"prune": _p("wanda", 0.6)}, _dsnot("mean", "attention")]
SETTINGS["wanda+dsnot(mlp)-60"] = [{"prune": _p("wanda", 0.6)}, _dsnot("mean", "mlp")]
SETTINGS["wanda+dsnot(all)-60"] = [{"prune": _p("wanda", 0.6)}, _dsnot("mean", "all")]
for _s in (0.6, 0.7, "2:4"):
    tag = _tag(_s)
    SETTINGS[f"wanda+dsnot(mean)-{tag}"] = [{"prune": _p("wanda", _s)}, _dsnot("mean", "all")]
    SETTINGS[f"wanda+dsnot(mse)-{tag}"] = [{"prune": _p("wanda", _s)}, _dsnot("mse", "all")]
    SETTINGS[f"wanda+dsnot(attn-mse)-{tag}"] = [{"prune": _p("wanda", _s)}, _dsnot("mse", "attention")]
    SETTINGS[f"wanda+dsnot(attn-mse-verify)-{tag}"] = [{"prune": _p("wanda", _s)}, _dsnot("mse", "attention", verify=True)]
for _s in (0.6, 0.7):  # = issue 3's defaults (mse, verify, all), spelled out
    SETTINGS[f"wanda+dsnot(all)-{int(_s * 100)}-verify"] = [{"prune": _p("wanda", _s)}, _dsnot("mse", "all", verify=True)]
# the reference code's effective settings: paper rule, attention only, sign check on (its N:M path)
SETTINGS["wanda+dsnot(ref)-2:4"] = [{"prune": _p("wanda", "2:4")}, {"refine": {
    "method": "dsnot", "criterion": "mean", "modules": "attention", "same_sign": True, "verify": False}}]
# DSnoT with exact swap scores from XᵀX (issue 19: no row's calibration output error ends worse than its start),
# each variant on the three starts (Wanda, SparseGPT, OWL + Wanda) at 60 %, 70 % and 2:4
def _dsnot_on_starts(variant: str, refine: dict) -> None:
    for s in (0.6, 0.7, "2:4"):
        tag, x = _tag(s), {"refine": refine}
        SETTINGS[f"wanda+dsnot({variant})-{tag}"] = [{"prune": _p("wanda", s)}, x]
        SETTINGS[f"sparsegpt+dsnot({variant})-{tag}"] = [{"prune": _p("sparsegpt", s)}, x]
        SETTINGS[f"owl+wanda+dsnot({variant})-{tag}"] = [{"allocate": {"method": "owl"}}, {"prune": _p("wanda", s)}, x]


_dsnot_on_starts("exact", {"method": "dsnot", "criterion": "exact", "shrink": 0.0, "modules": "all"})  # the full XᵀX
for _k in (0.25, 0.5, 0.75):  # exact scores from a shrunk XᵀX (less trust in the calibration text's correlations)
    _dsnot_on_starts(f"exact-s{_k}", {"method": "dsnot", "criterion": "exact", "shrink": _k, "modules": "all"})
# the default DSnoT: restricted to the MLP Linears (`modules: mlp`), because on Wanda 70 % KJV -> wiki the attention
# swaps were the ones that made it worse than its start
_dsnot_on_starts("mlp-exact", {"method": "dsnot", "criterion": "exact", "modules": "mlp"})
# Wanda true-sequential (q/k/v, o, gate/up, down each from the already pruned ones' outputs): one forward per layer
for _s in (0.5, 0.6, 0.7, "2:4"):
    tag = _tag(_s)
    SETTINGS[f"wanda-seq-{tag}"] = [{"prune": {**_p("wanda", _s), "true_sequential": True}}]
# SliceGPT (issue 4): both rotation schemes; speed is measured for these (structured: faster on any hardware)
for _s in (0.1, 0.2, 0.3):
    SETTINGS[f"slicegpt-{int(_s * 100)}"] = [{"slice": {"method": "slicegpt", "slicing": _s}}]
    # round_to 1: the stock LlamaConfig needs a multiple of SmolLM2's 9 heads; lcm(8, 9) = 72 would be too coarse
    SETTINGS[f"slicegpt-uniform-{int(_s * 100)}"] = [{"slice": {"method": "slicegpt", "slicing": _s, "rotation": "uniform", "round_to": 1}}]
# the uniform width with the default round_to 8: a multiple of lcm(8, 9 heads) = 72
SETTINGS["slicegpt-uniform-20-r8"] = [{"slice": {"method": "slicegpt", "slicing": 0.2, "rotation": "uniform"}}]
SETTINGS["slicegpt-headsliced-20"] = [{"slice": {"method": "slicegpt", "slicing": 0.2, "slice_head": True}}]
SETTINGS["slicegpt-uniform-tied-20"] = [{"slice": {"method": "slicegpt", "slicing": 0.2, "rotation": "uniform", "keep_tied": True, "round_to": 1}}]
SETTINGS["slicegpt-uniform-tied-0"] = [{"slice": {"method": "slicegpt", "slicing": 0.0, "rotation": "uniform", "keep_tied": True}}]
SETTINGS["slicegpt-uniform-0"] = [{"slice": {"method": "slicegpt", "slicing": 0.0, "rotation": "uniform"}}]
SETTINGS["slicegpt-0"] = [{"slice": {"method": "slicegpt", "slicing": 0.0}}]
SETTINGS["slicegpt-20+wanda-2:4"] = [{"slice": {"method": "slicegpt", "slicing": 0.2, "rotation": "uniform"}}, {"prune": _p("wanda", "2:4")}]
# MaskLLM (issue 6): the priors alone (zero steps, a prior so strong that the argmax is the prior: the
# prior's mask on the dense weights, no SparseGPT update), and learned from each prior; the training
# settings are those of recipes/maskllm-sparsegpt-2of4.yaml (about half an hour of 2 idle cores)
MASKLLM = {"method": "maskllm", "steps": 50, "batch_size": 2, "lr": 1e-3, "min_lr": 1e-4, "log_every": 1}
for _p0 in ("sparsegpt", "wanda"):
    SETTINGS[f"maskllm-prior-{_p0}-2:4"] = [{"learn": {"method": "maskllm", "prior": _p0, "steps": 0, "prior_strength": 1e4}}]
    SETTINGS[f"maskllm-{_p0}-2:4"] = [{"learn": {**MASKLLM, "prior": _p0}}]
# Reconstruction (issue 19): the one-shot masks frozen, the kept weights and norm scales trained block by
# block toward the dense model's outputs (sparsellm/recover/blockwise.py); the variants are the tuning runs
REC = {"method": "blockwise", "epochs": 2, "lr": 1e-3, "lr_scale": "none"}
# the learning rate relative to each tensor's size (lr_scale rms, the stage's default), tuned on Gemma 3 270M
REC_RMS = {"method": "blockwise", "epochs": 2, "lr": 5e-3, "lr_scale": "rms"}
for _s in ("2:4", 0.6, 0.7):
    SETTINGS[f"sparsegpt+rec-{_tag(_s)}"] = [{"prune": _p("sparsegpt", _s)}, {"reconstruct": REC}]
    SETTINGS[f"sparsegpt+rec(rms)-{_tag(_s)}"] = [{"prune": _p("sparsegpt", _s)}, {"reconstruct": REC_RMS}]
# SparseGPT with the exact masked least-squares refit of its kept weights (prune option `refit`), alone and
# before the reconstruction
for _s in (0.5, 0.6, 0.7, "2:4"):
    SETTINGS[f"sparsegpt(refit)-{_tag(_s)}"] = [{"prune": {**_p("sparsegpt", _s), "refit": True}}]
SETTINGS["sparsegpt(refit)+rec-2:4"] = [{"prune": {**_p("sparsegpt", "2:4"), "refit": True}}, {"reconstruct": REC}]
# after other mask sources: Wanda, and Wanda refined by DSnoT (the default of that time: every Linear)
SETTINGS["wanda+rec-2:4"] = [{"prune": _p("wanda", "2:4")}, {"reconstruct": REC}]
SETTINGS["wanda+dsnot+rec-2:4"] = [{"prune": _p("wanda", "2:4")}, {"refine": {"method": "dsnot", "modules": "all"}}, {"reconstruct": REC}]
# Structured pruning (issue 5): FFN channels removed; CFSP's block distances are computed once and reused
# (they do not depend on the target); recovery = LoRA on the calibration windows, sized to take a few minutes
# on 2 idle cores: 64 steps of one 512-token window = two epochs over the 32 calibration windows
RECOVER = {"method": "lora", "steps": 64, "batch_size": 1, "lr": 5e-4, "rank": 8, "alpha": 16}
for _s in (0.2, 0.5):
    _t = int(_s * 100)
    for _m in ("cfsp", "wanda-sp", "magnitude"):
        SETTINGS[f"{_m}-ffn{_t}"] = [{"structure": {"method": _m, "ffn": _s}}]
    SETTINGS[f"cfsp-ffn{_t}+lora"] = [{"structure": {"method": "cfsp", "ffn": _s}}, {"recover": RECOVER}]
    SETTINGS[f"cfsp-uniform-ffn{_t}"] = [{"structure": {"method": "cfsp", "ffn": _s, "uniform": True}}]
# control: the same LoRA recovery on the unpruned model (a structure stage that removes nothing: 0.1 % of
# 1536 channels rounds back to 1536), to separate recovery from adaptation to the calibration text's domain
SETTINGS["dense+lora"] = [{"structure": {"method": "wanda-sp", "ffn": 0.001, "uniform": True, "round_to": 8}}, {"recover": RECOVER}]
# speed depends on the shapes only: these settings have the shapes of another one, measured there
EXPORTED = ("cfsp-ffn20", "cfsp-uniform-ffn20")  # saved and reloaded: stock transformers vs the runtime file
SAME_SHAPES = {"dense+lora": None,  # the dense shapes: nothing to time
               "magnitude-ffn20": "wanda-sp-ffn20", "magnitude-ffn50": "wanda-sp-ffn50", "cfsp-ffn20+lora": "cfsp-ffn20",
               "cfsp-ffn50+lora": "cfsp-ffn50"}
GROUPS = {
    "issue2": ["dense", "magnitude-50", "magnitude-2:4", "magnitude-4:8", "wanda-50", "wanda-2:4", "wanda-4:8",
               "sparsegpt-50", "sparsegpt-2:4", "sparsegpt-4:8", "wanda-60", "wanda-70"],
    "issue3": [f"{m}-{t}" for t in ("60", "70", "2:4") for m in
               ("wanda", "wanda+dsnot", "sparsegpt", "sparsegpt+dsnot", "owl+wanda", "owl+wanda+dsnot", "ecoflap+wanda")],
    "issue4": ["slicegpt-0", "slicegpt-uniform-0"] + [f"slicegpt{m}-{t}" for t in ("10", "20", "30") for m in ("", "-uniform")]
              + ["slicegpt-uniform-20-r8", "slicegpt-headsliced-20", "slicegpt-uniform-tied-0", "slicegpt-uniform-tied-20"],
    "dsnot-variants": [f"wanda+dsnot({v})-{t}" for v in ("mean", "mse", "attn-mse", "attn-mse-verify") for t in ("60", "70", "2:4")]
                      + ["wanda+dsnot(attn)-60", "wanda+dsnot(mlp)-60", "wanda+dsnot(ref)-2:4"],
    "issue6": ["sparsegpt-2:4", "wanda-2:4", "maskllm-prior-sparsegpt-2:4", "maskllm-prior-wanda-2:4",
               "maskllm-sparsegpt-2:4", "maskllm-wanda-2:4"],
    "issue19": ["sparsegpt-2:4", "sparsegpt+rec-2:4", "sparsegpt-70", "sparsegpt+rec-70", "sparsegpt-60", "sparsegpt+rec-60"],
    "dsnot-mlp": [f"{m}-{t}" for t in ("60", "70", "2:4") for m in
                  ("wanda", "wanda+dsnot(mlp-exact)", "sparsegpt", "sparsegpt+dsnot(mlp-exact)", "owl+wanda",
                   "owl+wanda+dsnot(mlp-exact)")],
    "dsnot-exact": [f"{m}-{t}" for t in ("60", "70", "2:4") for m in
                    ("wanda", "wanda+dsnot(exact)", "sparsegpt", "sparsegpt+dsnot(exact)", "owl+wanda", "owl+wanda+dsnot(exact)")],
    "dsnot-shrunk": [f"{m}-{t}" for t in ("60", "70", "2:4") for m in
                     ("wanda", "wanda+dsnot(exact-s0.5)", "sparsegpt", "sparsegpt+dsnot(exact-s0.5)", "owl+wanda",
                      "owl+wanda+dsnot(exact-s0.5)")],
    "wanda-seq": [f"wanda{v}-{t}" for t in ("50", "60", "70", "2:4") for v in ("", "-seq")],
    "issue5": [f"{m}-ffn{t}" for t in ("20", "50") for m in ("cfsp", "wanda-sp", "magnitude")]
              + ["cfsp-ffn20+lora", "cfsp-ffn50+lora", "cfsp-uniform-ffn20", "dense+lora"],
}
NSAMPLES, SEQLEN, BATCH = 32, 512, 8
ALSO_CHUNKS = 24  # chunks of the --also-eval text (data/wiki_eval.txt: 51 in all)


def worker(name: str, model_dir: str, data: Path, importance: list[float] | None = None,
           block_distance: list[float] | None = None, also_eval: str | None = None,
           calib: str = "lee_calib.txt", evaluate: str = "lee_eval.txt", eval_chunks: int | None = None,
           calib_seed: int = 0) -> dict:
    import torch

    from sparsellm import memory
    from sparsellm.compress.structured import linear_flops
    from sparsellm.data import calibration_windows, evaluation_chunks
    from sparsellm.evaluate import perplexity, sparsity_summary
    from sparsellm.evaluate.speed import compare_speed
    from sparsellm.loading import get_adapter, load_model
    from sparsellm.handle import ModelHandle
    from sparsellm.pipeline import Timer, run_stages
    from sparsellm.stage import RunContext, build_stages
    from sparsellm.recipe import recipe_from_dict

    torch.set_num_threads(2)
    torch.manual_seed(0)
    loaded = load_model(model_dir)
    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    windows = calibration_windows(tok, str(data / calib), NSAMPLES, SEQLEN, seed=calib_seed)
    bos = tok.bos_token_id if adapter.needs_bos else None  # as the CLI: each chunk starts with BOS (Gemma)
    chunks = evaluation_chunks(tok, str(data / evaluate), SEQLEN, eval_chunks, bos)
    row = {"setting": name, "seconds": None, "dense_forward_seconds": None,
           "params_before": sum(p.numel() for p in model.parameters())}
    structured = any("slice" in st or "structure" in st for st in SETTINGS[name] or [])
    timed = structured and name not in SAME_SHAPES
    dense_copy = copy.deepcopy(model) if timed else None  # timed against the compressed model, interleaved
    row["flops_before"] = linear_flops(model)
    memory.reset_peak()
    rss0 = memory.current_rss_bytes()
    if SETTINGS[name] is None:
        with torch.no_grad():
            t = time.perf_counter()
            for batch in windows.split(BATCH):
                model(input_ids=batch, use_cache=False)
            row["dense_forward_seconds"] = time.perf_counter() - t
    else:
        stages = json.loads(json.dumps(SETTINGS[name]))
        for st in stages:  # ECoFLaP's importance does not depend on the target: estimate it once per benchmark
            if importance and st.get("allocate", {}).get("method") == "ecoflap":
                st["allocate"]["importance"] = importance
                row["importance_reused"] = True
            cfsp = st.get("structure", {})
            if block_distance and cfsp.get("method") == "cfsp" and not cfsp.get("uniform"):
                cfsp["block_distance"] = block_distance
                row["importance_reused"] = True
        recipe = recipe_from_dict({"seed": calib_seed, "calibration": {"batch_size": BATCH, "dataset": str(data / calib),
                                                                   "seqlen": SEQLEN}, "stages": stages})
        ctx = RunContext(handle=ModelHandle(model, tok, adapter, loaded.source), adapter=adapter, tokenizer=tok,
                         recipe=recipe, device=torch.device("cpu"), windows=windows, seqlen=SEQLEN, timer=Timer())
        built = build_stages(recipe)
        for st in built:  # a learn stage draws its training windows (as many as its steps need)
            st.prepare(ctx)
        t, cpu = time.perf_counter(), time.process_time()
        stages = run_stages(built, ctx)
        allocation = ctx.results.get("allocation")
        row["seconds"] = time.perf_counter() - t
        row["cpu_seconds"] = time.process_time() - cpu  # all threads: the machine's cores are shared
        row["stage_seconds"] = {f"{st['kind']} {st['method']}": st["seconds"] for st in stages}
        row["allocation"] = allocation
    row["peak_rss_bytes"] = memory.peak_rss_bytes()
    row["rss_before_bytes"] = rss0
    row["sparsity"] = sparsity_summary(model, adapter)["overall"]
    row["params"] = sum(p.numel() for p in model.parameters())
    row["hidden_size"] = model.config.hidden_size
    row["flops"] = linear_flops(model)
    row["details"] = [st.get("details") for st in stages] if SETTINGS[name] else None
    if timed:
        speed = compare_speed({"dense": dense_copy, "compressed": model})
        row["speed_dense"], row["speed"] = speed["dense"], speed["compressed"]
        del dense_copy
    if name in EXPORTED:
        row["export"] = export_check(model, tok, chunks[:2])
    row["ppl"] = perplexity(model, chunks, batch_size=4, desc=f"ppl {name}")
    if also_eval:  # a second text of another domain: its first ALSO_CHUNKS chunks
        row["ppl_also"] = perplexity(model, evaluation_chunks(tok, also_eval, SEQLEN, ALSO_CHUNKS, bos), batch_size=4,
                                     desc=f"ppl {name} {Path(also_eval).name}")
    row["eval_tokens"] = int(chunks.numel())
    return row


def export_check(model, tok, ids) -> dict:
    """Save the model folder, reload it with plain transformers (trust_remote_code only when the folder
    needs its modeling file) and compare logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsellm.export import save_model

    with tempfile.TemporaryDirectory() as d:
        save_model(model, tok, Path(d))
        cfg = json.loads((Path(d) / "config.json").read_text())
        remote = "auto_map" in cfg
        loaded = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=remote).eval()
        with torch.no_grad():
            same = torch.equal(model(ids).logits, loaded(ids).logits)
        return {"model_type": cfg["model_type"], "trust_remote_code": remote, "identical_logits": same,
                "bytes": sum(f.stat().st_size for f in Path(d).iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "data",
                    help="folder of lee_calib.txt and lee_eval.txt (bash scripts/get_demo_data.sh writes them)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", help="comma-separated settings or groups (" + ", ".join(GROUPS) + "); settings: " + ", ".join(SETTINGS))
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--also-eval", help="also the perplexity on the first 24 chunks of this text (e.g. data/wiki_eval.txt "
                    "from scripts/get_wiki_eval.sh: another domain than the calibration's)")
    ap.add_argument("--calib", default="lee_calib.txt", help="calibration text in --data (the protocol's: lee_calib.txt; "
                    "the second pair of issue 19: kjv_calib.txt from scripts/get_second_pair.sh)")
    ap.add_argument("--eval", default="lee_eval.txt", help="evaluation text in --data (lee_eval.txt; second pair: wiki_eval.txt)")
    ap.add_argument("--eval-chunks", type=int, help="only the first N chunks of --eval (default: all)")
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows' draw (the protocol's: 0)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--importance", help=argparse.SUPPRESS)
    ap.add_argument("--block-distance", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        imp = json.loads(args.importance) if args.importance else None
        dist = json.loads(args.block_distance) if args.block_distance else None
        print("RESULT " + json.dumps(worker(args.worker, args.model_dir, args.data, imp, dist, args.also_eval,
                                                     args.calib, args.eval, args.eval_chunks, args.calib_seed)), flush=True)
        return

    names = [n for part in (args.only.split(",") if args.only else ["issue2", "issue3"]) for n in GROUPS.get(part, [part])]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown settings: {unknown}")
    with tempfile.TemporaryDirectory() as tmp:
        # dequantize the GGUF once; workers load the fp32 safetensors copy in seconds
        from sparsellm.loading import load_model

        loaded = load_model(args.model)
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        del loaded
        rows, importance, distance = [], None, None
        for name in names:
            extra = ["--importance", json.dumps(importance)] if importance else []
            extra += ["--block-distance", json.dumps(distance)] if distance else []
            extra += ["--also-eval", args.also_eval] if args.also_eval else []
            extra += ["--calib", args.calib, "--eval", args.eval]
            extra += ["--eval-chunks", str(args.eval_chunks)] if args.eval_chunks else []
            extra += ["--calib-seed", str(args.calib_seed)]
            # passive OpenMP waits: on shared cores spinning threads steal the time of the others (a 2-thread
            # SparseGPT pass ran 6x slower among other busy processes); the results do not depend on it
            env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--model-dir", tmp, "--data", str(args.data)] + extra,
                                  capture_output=True, text=True, env=env)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[7:]))
            importance = importance or (rows[-1].get("allocation") or {}).get("importance")
            distance = distance or next((d["block_distance"] for d in rows[-1].get("details") or [] if d and "block_distance" in d), None)
            also = f" ({Path(args.also_eval).name}: {rows[-1]['ppl_also']:.3f})" if args.also_eval else ""
            print(f"done {name}: ppl {rows[-1]['ppl']:.3f}{also} in {rows[-1]['seconds'] or 0:.1f} s "
                  f"{rows[-1].get('stage_seconds') or ''}", file=sys.stderr, flush=True)
            if args.json:  # after every setting, so a long run can be inspected or resumed
                args.json.write_text(json.dumps(rows, indent=2))

    dense_fwd = next((r["dense_forward_seconds"] for r in rows if r["dense_forward_seconds"]), None)
    print(f"\nSmolLM2-135M-Instruct fp32, {NSAMPLES}x{SEQLEN} calibration tokens from {args.calib}, "
          f"perplexity on {rows[0]['eval_tokens']} tokens of {args.eval} (seqlen {SEQLEN}), torch threads 2\n")
    print("| setting | perplexity | sparsity | parameters | compression s | × dense fwd | of which allocate / refine s "
          "| peak RSS MiB | prefill tok/s (dense) | decode tok/s (dense) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}" + (" *" if r.get("importance_reused") else "")
        ratio = "-" if r["seconds"] is None or not dense_fwd else f"{r['seconds'] / dense_fwd:.2f}"
        if r.get("cpu_seconds") is not None:
            secs += f" (cpu {r['cpu_seconds']:.0f})"
        if r["dense_forward_seconds"]:
            secs = f"(fwd {r['dense_forward_seconds']:.1f})"
        st = r.get("stage_seconds") or {}
        parts = [f"{v:.1f}" for k, v in st.items() if k.split()[0] in ("allocate", "refine")]
        speed = ["-", "-"]
        if r.get("speed"):
            speed = [f"{r['speed'][k]:.0f} ({r['speed_dense'][k]:.0f})" for k in ("prefill_tokens_per_s", "decode_tokens_per_s")]
        print(f"| {r['setting']} | {r['ppl']:.3f} | {r['sparsity']:.4f} | {r['params']:,} | {secs} | {ratio} | "
              f"{' / '.join(parts) or '-'} | {r['peak_rss_bytes'] / 2**20:,.0f} | {speed[0]} | {speed[1]} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    structured_table(rows)


def structured_table(rows: list[dict]) -> None:
    """Issue 5: structured pruning against dense, with the speedup as a fraction of the FLOP reduction."""
    rows = [r for r in rows if any("structure" in st for st in SETTINGS[r["setting"]] or [])]
    if not rows:
        return
    timed = {r["setting"]: r for r in rows if r.get("speed")}
    print("\n| setting | perplexity | FFN widths min–max | parameters (dense) | compression s | recovery steps / tokens / s "
          "| F = dense / pruned Linear FLOPs per token | prefill tok/s (dense) | decode tok/s (dense) | speedup prefill / decode "
          "| share of the ideal gain (S−1)/(F−1) prefill / decode |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    exports = []
    for r in rows:
        if r.get("export"):
            e = r["export"]
            exports.append(f"- {r['setting']}: model_type `{e['model_type']}`, "
                           f"{'needs trust_remote_code=True' if e['trust_remote_code'] else 'stock transformers, no custom code'}, "
                           f"reloaded logits identical: {e['identical_logits']}, folder {e['bytes'] / 2**20:.0f} MiB")
        d = [x for x in r["details"] if x]
        widths = d[0]["intermediate_size"]
        rec = next((x for x in d if "steps" in x), None)
        recovery = f"{rec['steps']} / {rec['tokens']:,} / {rec['seconds']:.0f}" if rec else "-"
        flops = r["flops"] / r["flops_before"]
        t = timed.get(SAME_SHAPES.get(r["setting"], r["setting"]))
        speed = ["-"] * 4
        if t:
            ups = [t["speed"][k] / t["speed_dense"][k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")]
            shared = "" if t is r else f" (= {t['setting']})"
            speed = [f"{t['speed'][k]:.0f} ({t['speed_dense'][k]:.0f}){shared}" for k in ("prefill_tokens_per_s", "decode_tokens_per_s")]
            speed += [f"{ups[0]:.2f}× / {ups[1]:.2f}×", f"{(ups[0] - 1) / (1 / flops - 1):.2f} / {(ups[1] - 1) / (1 / flops - 1):.2f}"]
        secs = f"{r['seconds']:.1f}" + (" *" if r.get("importance_reused") else "")
        print(f"| {r['setting']} | {r['ppl']:.3f} | {min(widths)}–{max(widths)} | {r['params']:,} ({r['params_before']:,}) "
              f"| {secs} | {recovery} | {1 / flops:.3f} | {speed[0]} | {speed[1]} | {speed[2]} | {speed[3]} |")
    if exports:
        print("\nExport round trip (save, reload with AutoModelForCausalLM):\n" + "\n".join(exports))


if __name__ == "__main__":
    main()
