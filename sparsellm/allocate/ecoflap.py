"""ECoFLaP (Sung et al., ICLR 2024): layer-wise sparsity from a global, forward-only importance.

Each decoder layer's importance is the size of the loss's directional derivative along random
directions in its weights, estimated by two-sided finite differences (zeroth order: forward passes
only, no activation memory for a backward pass). Layers then keep weights in proportion to their
importance (every layer keeps at least 1 − max_sparsity), and Wanda prunes inside each layer.

The reference perturbs one weight matrix at a time; here all pruned matrices of a decoder layer are
perturbed together (7x fewer passes for Llama layers), and each probe re-runs only the layers from
the perturbed one to the head, starting from cached dense inputs."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
import torch.nn.functional as F

from ..calibrate.engine import target_linears
from ..calibrate.walk import capture, layer_forward, module_device, walk_layers
from ..errors import RecipeError
from ..stage import register
from .base import AllocateSpec, water_fill


class ECoFLaPAllocate(AllocateSpec):
    """Layer sparsity from a zeroth-order (forward-only) estimate of each layer's global importance (Sung et al., 2024)."""
    method: Literal["ecoflap"]
    nsamples: int = Field(8, gt=0, description="calibration windows used for the estimate (the first ones)")
    num_noise: int = Field(2, gt=0, description="random directions per window and layer")
    eps: float = Field(1e-3, gt=0.0, description="finite-difference step along each direction")
    aggregate: Literal["sum", "avg"] = Field("sum", description="layer score: summed, or divided by the layer's parameter count")
    importance: list[float] | None = Field(None, description="per-layer importance from an earlier run's report.json "
                                           "(allocation.importance): skips the estimate, e.g. to try other targets")

    def max_at(self, target: float) -> float:
        return self.max_sparsity if self.max_sparsity is not None else min(0.99, target + 0.1)  # as its scripts cap it


@torch.no_grad()
def _loss_from(model, adapter, start: int, hidden, kwargs: list[dict], labels, device) -> float:
    """The loss of one batch from decoder layer `start` on; `kwargs[j]`: layer j's keyword arguments."""
    layers = adapter.layers(model)
    for j in range(start, len(layers)):
        layer = layers[j]
        home = module_device(layer)
        layer.to(device)
        hidden = layer_forward(layer, hidden, kwargs[j])
        layer.to(home)
    for m in adapter.head_modules(model):
        hidden = m(hidden)
    logits = hidden[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device)))


@torch.no_grad()
def _layer_score(model, adapter, index: int, linears, acts, labels, num_noise: int, eps: float, gen, device) -> float:
    """Mean |L(θ + εz) − L(θ − εz)| / 2ε over the windows and `num_noise` directions z in `linears`."""
    originals = [lin.weight.detach().clone() for lin in linears]
    total, probes = 0.0, 0
    try:
        for b, (hidden, lab) in enumerate(zip(acts.hidden, labels)):
            kw = [per_batch[b] for per_batch in acts.per_layer]
            for _ in range(num_noise):
                zs = [torch.randn(w.shape, generator=gen).to(w.device, w.dtype) for w in originals]
                losses = []
                for sign in (1.0, -1.0):
                    for lin, w, z in zip(linears, originals, zs):
                        lin.weight.copy_(w + sign * eps * z)
                    losses.append(_loss_from(model, adapter, index, hidden, kw, lab, device))
                total += abs(losses[0] - losses[1]) / (2 * eps)
                probes += 1
    finally:  # restore exactly, not by subtracting the noise back, whatever happened
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return total / max(probes, 1)


@torch.no_grad()
def layer_importance(model, adapter, windows, select, device, batch_size: int, num_noise: int, eps: float, seed: int) -> list[float]:
    """Mean over windows and directions z ~ N(0, I) of |L(θ + εz) − L(θ − εz)| / 2ε, per decoder layer."""
    device = torch.device(device)
    acts = capture(model, adapter, windows, device, batch_size)
    labels = list(windows.split(batch_size))
    # after capturing: capture sends the embedding home again, and it may be tied to lm_head
    head = adapter.head_modules(model)
    head_homes = [module_device(m) for m in head]
    for m in head:
        m.to(device)
    scores = []
    try:
        for index, layer in walk_layers(model, adapter, device, desc="ecoflap importance"):
            linears = list(target_linears(layer, adapter.layer_prefix(index), select).values())
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + index)
            scores.append(_layer_score(model, adapter, index, linears, acts, labels, num_noise, eps, gen, device))
            acts.advance(layer)
    finally:
        for m, home in zip(head, head_homes):
            m.to(home)
    return scores


def ecoflap_allocate(model, adapter, windows, select, device, target: float, max_sparsity: float, spec, seed: int,
                     sizes) -> tuple[list[float], dict]:
    if spec.importance is not None:
        if len(spec.importance) != len(sizes):
            raise RecipeError(f"ecoflap importance has {len(spec.importance)} values; the model has {len(sizes)} layers")
        scores = list(spec.importance)
    else:
        # one window per probe: more random directions for the same tokens, a less noisy estimate
        scores = layer_importance(model, adapter, windows[: spec.nsamples], select, device, 1,
                                  spec.num_noise, spec.eps, seed)
    params = [sum(r * c for r, c in shapes) for shapes in sizes]
    weights = [s / p if p else 0.0 for s, p in zip(scores, params)] if spec.aggregate == "avg" else scores
    return water_fill(weights, params, target, max_sparsity), {"importance": scores}


def ecoflap_allocation(spec, *, model, adapter, windows, select, device, batch_size, seed, target, hi, sizes, io):
    if io is not None:
        raise RecipeError("ECoFLaP's importance probes run every layer after the perturbed one, which needs the whole "
                          "model; allocate with owl instead, or run in memory")
    return ecoflap_allocate(model, adapter, windows, select, device, target, hi, spec, seed, sizes)


register("allocate", ECoFLaPAllocate, ecoflap_allocation)
