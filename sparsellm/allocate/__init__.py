"""Layer-wise sparsity allocation: how much of each decoder layer the next prune stage removes."""
from __future__ import annotations

from ..calibrate.engine import MIN_EXPERT_TOKENS, layer_targets
from ..stage import implementation
from .base import fit_mean, realized, round_nm


def layer_shapes(model, adapter, select) -> list[list[tuple[int, int]]]:
    return [[tuple(lin.weight.shape) for lin in layer_targets(adapter, layer, adapter.layer_prefix(i), select).values()]
            for i, layer in enumerate(adapter.layers(model))]


def allocate(spec, prune_spec, model, adapter, windows, select, device, batch_size: int, seed: int, io=None,
             min_expert_tokens: int = MIN_EXPERT_TOKENS) -> dict:
    """Per-layer sparsities for `prune_spec` whose realized overall sparsity meets its target.
    `io`: the read-only layer io of a model not held whole in memory (streamed or offloaded).
    `min_expert_tokens`: experts with fewer calibration tokens are scored data-free (mixture of experts).
    Returns {"sparsity": [...], "target": t, "realized": r, plus the method's per-layer scores}."""
    target = prune_spec.sparsity
    sizes = layer_shapes(model, adapter, select)
    hi = spec.max_at(target)
    run = implementation("allocate", spec.method)
    raw, scores = run(spec, model=model, adapter=adapter, windows=windows, select=select, device=device,
                      batch_size=batch_size, seed=seed, target=target, hi=hi, sizes=sizes, io=io,
                      min_expert_tokens=min_expert_tokens)
    sparsity = fit_mean(raw, sizes, target, spec.min_sparsity, hi)
    if prune_spec.nm:
        sparsity = round_nm(sparsity, sizes, target, prune_spec.nm[1])
    return {"method": spec.method, "target": target, "sparsity": sparsity, "realized": realized(sparsity, sizes), **scores}


__all__ = ["allocate", "fit_mean", "realized", "round_nm", "layer_shapes"]
