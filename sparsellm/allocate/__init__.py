"""Layer-wise sparsity allocation: how much of each decoder layer the next prune stage removes."""
from __future__ import annotations

from ..calibrate.engine import target_linears
from .base import fit_mean, realized, round_nm
from .ecoflap import ecoflap_allocate
from .owl import owl_allocate


def layer_shapes(model, adapter, select) -> list[list[tuple[int, int]]]:
    return [[tuple(lin.weight.shape) for lin in target_linears(layer, adapter.layer_prefix(i), select).values()]
            for i, layer in enumerate(adapter.layers(model))]


def allocate(spec, prune_spec, model, adapter, windows, select, device, batch_size: int, seed: int, io=None) -> dict:
    """Per-layer sparsities for `prune_spec` whose realized overall sparsity meets its target.
    `io`: the read-only layer stream of a low-memory run (OWL only; ECoFLaP needs the whole model).
    Returns {"sparsity": [...], "target": t, "realized": r, plus the method's per-layer scores}."""
    target = prune_spec.sparsity
    sizes = layer_shapes(model, adapter, select)
    # defaults: OWL only needs room below 1; ECoFLaP's scripts cap layers at target + 0.1
    hi = spec.max_sparsity if spec.max_sparsity is not None else 0.99 if spec.method == "owl" else min(0.99, target + 0.1)
    if spec.method == "owl":
        raw, scores = owl_allocate(model, adapter, windows, select, device, batch_size, target, spec.lam, spec.M, io)
    else:
        raw, scores = ecoflap_allocate(model, adapter, windows, select, device, target, hi, spec, seed, sizes)
    sparsity = fit_mean(raw, sizes, target, spec.min_sparsity, hi)
    if prune_spec.nm:
        sparsity = round_nm(sparsity, sizes, target, prune_spec.nm[1])
    return {"method": spec.method, "target": target, "sparsity": sparsity, "realized": realized(sparsity, sizes), **scores}


__all__ = ["allocate", "fit_mean", "realized", "round_nm", "layer_shapes"]
