#!/usr/bin/env python
"""Disk size of the export formats on SmolLM2-135M-Instruct pruned by Wanda (50 % unstructured and 2:4,
calibration of the benchmark protocol: 32 windows of 512 tokens from lee_calib.txt, seed 0), saved in
bfloat16 and float16. For each, model.safetensors in every format against the dense file of the same
dtype, for the whole file and for the pruned Linear weights alone (embeddings and norms stay dense).
Every compressed folder is loaded back and must give the dense weights bit for bit.

    .venv/bin/python scripts/format_sizes.py [--data data] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsellm.export import save_model  # noqa: E402
from sparsellm.formats import sparse_linears  # noqa: E402
from sparsellm.loading import load_model  # noqa: E402
from sparsellm.pipeline import RunOptions, compress  # noqa: E402
from sparsellm.recipe import recipe_from_dict  # noqa: E402



def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def linear_bytes(sizes: dict[str, int], modules: set[str]) -> int:
    return sum(n for k, n in sizes.items() if k.rpartition(".")[0] in modules)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data")  # bash scripts/get_demo_data.sh
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep the pruned fp32 folders here, and reuse them on the next run")
    ap.add_argument("--method-24", default="wanda", choices=["wanda", "magnitude"],
                    help="method of the 2:4 model (the sizes depend only on the shapes and the count of nonzeros)")
    args = ap.parse_args()
    prunes = {"wanda 50 %": {"method": "wanda", "sparsity": 0.5},
              f"{args.method_24} 2:4": {"method": args.method_24, "pattern": "2:4"}}
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, stage in prunes.items():
            pruned = (args.keep or tmp) / label.replace(" ", "").replace("%", "").replace(":", "of")
            recipe = recipe_from_dict({"seed": 0, "stages": [{"prune": stage}], "calibration": {
                "dataset": str(args.data / "lee_calib.txt"), "nsamples": 32, "seqlen": 512, "batch_size": 8}})
            if not (pruned / "model.safetensors").exists():
                compress(recipe, pruned, RunOptions(), args.model)
            for dtype in ("bfloat16", "float16"):
                loaded = load_model(str(pruned), dtype)
                model, modules = loaded.model, set(sparse_linears(loaded.model))
                fmts = ["dense", "sparse-bitmask"] + (["sparse-24-bitmask"] if ":" in label else [])
                sizes = {}
                for fmt in fmts:
                    out = tmp / f"{pruned.name}-{dtype}-{fmt}"
                    save_model(model, loaded.tokenizer, out, fmt)
                    f = out / "model.safetensors"
                    sizes[fmt] = (f.stat().st_size, linear_bytes(tensor_bytes(f), modules))
                    back = load_model(str(out)).model.state_dict()
                    assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items()), (label, dtype, fmt)
                    if fmt != "dense":
                        (whole, lin), (dwhole, dlin) = sizes[fmt], sizes["dense"]
                        sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
                        rows.append({"pruning": label, "dtype": dtype, "format": fmt, "bytes": whole,
                                     "global_sparsity": sc["global_sparsity"], "ignore": sc["ignore"],
                                     "dense_bytes": dwhole, "ratio": whole / dwhole, "linear_bytes": lin,
                                     "dense_linear_bytes": dlin, "linear_ratio": lin / dlin,
                                     "linear_modules": len(modules)})
                        print(f"done {label} {dtype} {fmt}", file=sys.stderr, flush=True)
    print("\n| pruning | dtype | format | model.safetensors MB (dense) | whole-file ratio | pruned Linears MB (dense) "
          "| Linears-only ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pruning']} | {r['dtype']} | {r['format']} | {r['bytes'] / 1e6:.1f} ({r['dense_bytes'] / 1e6:.1f}) | "
              f"{r['ratio']:.3f} | {r['linear_bytes'] / 1e6:.1f} ({r['dense_linear_bytes'] / 1e6:.1f}) | "
              f"{r['linear_ratio']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
