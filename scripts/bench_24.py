#!/usr/bin/env python
"""2:4 semi-structured sparse kernels (torch.sparse.to_sparse_semi_structured) against dense on a CUDA GPU.

1. matmul: F.linear on the Linear shapes of Llama-7B (q/k/v/o 4096x4096, gate/up 11008x4096,
   down 4096x11008) with 2:4 weights, for several token counts (1 = decode, more = prefill);
   CUDA-event timing, median of repeats after warm-up, dense and sparse interleaved.
2. end-to-end: prefill and decode tokens/s (sparsellm.evaluate.speed.compare_speed, interleaved) of a
   Llama-7B-shaped model with --layers decoder layers (random weights pruned 2:4 by magnitude; speed
   does not depend on the values), or of --model (a folder/GGUF; pruned 2:4 by magnitude if it is not).

Without a CUDA GPU of compute capability 8.0+ it prints why it skipped and exits 0. --dry-run runs the
whole harness on CPU with small shapes and without the conversion (checks the script, not the kernels).

    .venv/bin/python scripts/bench_24.py [--dtype float16] [--layers 4] [--model DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsellm.compress.masks import nm_mask  # noqa: E402
from sparsellm.evaluate.speed import compare_speed  # noqa: E402
from sparsellm.formats import is_24  # noqa: E402
from sparsellm.loading.semi_structured import accelerate_24  # noqa: E402

LLAMA7B = {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (the 2:4 semi-structured kernels need an NVIDIA GPU, compute capability 8.0+)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the GPU has compute capability {major}.{minor}; the 2:4 semi-structured kernels need 8.0+"
    return None


def prune_24(weight: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call (CUDA events on a GPU)."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


@torch.no_grad()
def bench_matmul(shapes: dict, tokens: list[int], dtype, device, sparse: bool, repeats: int, warmup: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (out_f, in_f) in shapes.items():
        w = prune_24(torch.randn(out_f, in_f, generator=gen)).to(device, dtype)
        ws = to_sparse_semi_structured(w) if sparse else w
        for n in tokens:
            x = torch.randn(n, in_f, generator=gen).to(device, dtype)
            err = (F.linear(x, ws) - F.linear(x, w)).abs().max().item() / F.linear(x, w).abs().max().item()
            times = {"dense": [], "2:4": []}
            for r in range(warmup + repeats):
                for key, weight in (("dense", w), ("2:4", ws)):
                    s = timed(lambda: F.linear(x, weight), device)
                    if r >= warmup:
                        times[key].append(s)
            d, s = statistics.median(times["dense"]), statistics.median(times["2:4"])
            rows.append({"layer": name, "shape": [out_f, in_f], "tokens": n, "dense_ms": d * 1e3, "sparse_ms": s * 1e3,
                         "speedup": d / s, "max_rel_error": err})
            print(f"matmul {name} {out_f}x{in_f} tokens {n}: dense {d * 1e3:.3f} ms, 2:4 {s * 1e3:.3f} ms, "
                  f"x{d / s:.2f}", file=sys.stderr, flush=True)
    return rows


def llama_like(layers: int, dtype, small: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    size = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4) if small else \
        dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg = LlamaConfig(vocab_size=32000, num_hidden_layers=layers, max_position_embeddings=4096, **size)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def bench_decode(model, device, sparse: bool, decode_tokens: int, repeats: int) -> dict:
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name and not is_24(mod.weight):
            mod.weight.copy_(prune_24(mod.weight))
    model.to(device)
    fast = copy.deepcopy(model)
    conversion = accelerate_24(fast) if sparse else {"converted": [], "skipped": {}}
    speed = compare_speed({"dense": model, "2:4": fast}, device, prefill_tokens=512, decode_prompt=64,
                          decode_tokens=decode_tokens, repeats=repeats)
    return {"converted": len(conversion["converted"]), "skipped": conversion["skipped"], "speed": speed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16")
    ap.add_argument("--tokens", default="1,16,128,2048", help="token counts for the matmul benchmark")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the Llama-7B-shaped model")
    ap.add_argument("--model", help="measure decode on this model (folder, GGUF, smollm2-135m) instead")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="run the harness on CPU, small shapes, no conversion")
    args = ap.parse_args()
    reason = None if args.dry_run else skip_reason()
    if reason:
        print(f"bench_24: skipped: {reason}")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else DTYPES[args.dtype]
    shapes = {k: (o // 16, i // 16) for k, (o, i) in LLAMA7B.items()} if args.dry_run else LLAMA7B
    tokens = [int(t) for t in args.tokens.split(",")]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run, no conversion)",
              "torch": torch.__version__, "dtype": str(dtype), "dry_run": args.dry_run}
    result["matmul"] = bench_matmul(shapes, tokens, dtype, device, not args.dry_run, args.repeats, warmup=3)
    if args.model:
        from sparsellm.loading import load_model

        model, label = load_model(args.model, "float32" if args.dry_run else args.dtype).model, args.model
    else:
        model, label = llama_like(args.layers, dtype, args.dry_run), f"Llama-7B-shaped, {args.layers} layers"
    result["decode_model"] = label
    result["decode"] = bench_decode(model, device, not args.dry_run, args.decode_tokens, min(args.repeats, 5))
    print(f"\n{result['device']}, {args.dtype if not args.dry_run else 'float32'}, torch {torch.__version__}\n")
    print("| layer | weight | tokens | dense ms | 2:4 ms | speedup | max rel. error |\n|---|---|---|---|---|---|---|")
    for r in result["matmul"]:
        print(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['dense_ms']:.3f} | "
              f"{r['sparse_ms']:.3f} | {r['speedup']:.2f} | {r['max_rel_error']:.1e} |")
    sp = result["decode"]["speed"]
    print(f"\n{label}: {result['decode']['converted']} Linear weights converted\n")
    print("| model | prefill tok/s | decode tok/s |\n|---|---|---|")
    for name in ("dense", "2:4"):
        print(f"| {name} | {sp[name]['prefill_tokens_per_s']:.1f} | {sp[name]['decode_tokens_per_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
