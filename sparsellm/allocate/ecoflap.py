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

from ..calibrate.engine import layer_targets
from ..calibrate.walk import capture, head_on, layer_forward, walk_layers
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


def _loss(model, adapter, hidden, labels) -> float:
    """The mean next-token loss of one batch from the last decoder layer's output."""
    logits = adapter.head_logits(model, hidden)[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device)))


@torch.no_grad()
def _perturbed_outputs(layer, linears, acts, num_noise: int, eps: float, gen) -> list[tuple[int, list[torch.Tensor]]]:
    """For each window b and each of `num_noise` directions z in `linears` (drawn from `gen` in that order):
    (b, [the layer's output with θ + εz, with θ − εz])."""
    originals = [lin.weight.detach().clone() for lin in linears]
    probes = []
    try:
        for b, hidden in enumerate(acts.hidden):
            for _ in range(num_noise):
                zs = [torch.randn(w.shape, generator=gen).to(w.device, w.dtype) for w in originals]
                pair = []
                for sign in (1.0, -1.0):
                    for lin, w, z in zip(linears, originals, zs):
                        lin.weight.copy_(w + sign * eps * z)
                    pair.append(layer_forward(layer, hidden, acts.kwargs[b]))
                probes.append((b, pair))
    finally:  # restore exactly, not by subtracting the noise back, whatever happened
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return probes


@torch.no_grad()
def layer_importance(model, adapter, windows, select, device, batch_size: int, num_noise: int, eps: float, seed: int,
                     io=None) -> list[float]:
    """Mean over windows and directions z ~ N(0, I) of |L(θ + εz) − L(θ − εz)| / 2ε, per decoder layer.
    Each probe's perturbed output goes through the later layers, one layer at a time for all probes
    together, so that a model held one layer at a time (`io`, read-only) brings each layer in once per
    perturbed layer."""
    device = torch.device(device)
    acts = capture(model, adapter, windows, device, batch_size)
    labels = list(windows.split(batch_size))
    scores = []
    # after capturing: capture sends the embedding home again, and it may be tied to lm_head
    with head_on(model, adapter, device, io):
        for index, layer in walk_layers(model, adapter, device, io, "ecoflap importance"):
            linears = list(layer_targets(adapter, layer, adapter.layer_prefix(index), select).values())
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + index)
            probes = _perturbed_outputs(layer, linears, acts, num_noise, eps, gen)
            for j, later in walk_layers(model, adapter, device, io, f"ecoflap probes {index}", start=index + 1,
                                        leave=False):
                probes = [(b, [layer_forward(later, h, acts.per_layer[j][b]) for h in pair]) for b, pair in probes]
            total = 0.0
            for b, (plus, minus) in probes:
                total += abs(_loss(model, adapter, plus, labels[b]) - _loss(model, adapter, minus, labels[b])) / (2 * eps)
            scores.append(total / max(len(probes), 1))
            acts.advance(layer)
    return scores


def ecoflap_allocate(model, adapter, windows, select, device, target: float, max_sparsity: float, spec, seed: int,
                     sizes, io=None) -> tuple[list[float], dict]:
    if spec.importance is not None:
        if len(spec.importance) != len(sizes):
            raise RecipeError(f"ecoflap importance has {len(spec.importance)} values; the model has {len(sizes)} layers")
        scores = list(spec.importance)
    else:
        # one window per probe: more random directions for the same tokens, a less noisy estimate
        scores = layer_importance(model, adapter, windows[: spec.nsamples], select, device, 1,
                                  spec.num_noise, spec.eps, seed, io)
    params = [sum(r * c for r, c in shapes) for shapes in sizes]
    weights = [s / p if p else 0.0 for s, p in zip(scores, params)] if spec.aggregate == "avg" else scores
    return water_fill(weights, params, target, max_sparsity), {"importance": scores}


def ecoflap_allocation(spec, *, model, adapter, windows, select, device, batch_size, seed, target, hi, sizes, io,
                       min_expert_tokens=None):  # forward-only: no input statistics
    return ecoflap_allocate(model, adapter, windows, select, device, target, hi, spec, seed, sizes, io)


register("allocate", ECoFLaPAllocate, ecoflap_allocation)
