"""CFSP (Wang et al., COLING 2025): coarse-to-fine structured pruning.

Coarse: a block that changes its input more (larger mean angular distance between the hidden states
entering and leaving it, on the dense model) keeps more of its FFN: keep_i ∝ sigmoid(a·(d_i − mean d)),
scaled so that the mean keep ratio is 1 − target, deviations shrunk until no block keeps more than
max_keep. Fine: within a block, channels ranked by the relative size of their weights in down, up and
gate (down weighted by the activation norm^b), times the channel's activation norm^c.

The reference code normalises each |W| term over the hidden dimension of its own column, so every
term averages to the same constant per channel and the ranking collapses to activation norm alone.
Here each term is normalised over the channels within each hidden row (how much of row k's mass sits
in channel j), then averaged over the rows: the weights really take part in the ranking."""
from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from ..calibrate.walk import capture, layer_forward, walk_layers
from ..stage import register
from .structured import StructureSpec, StructuredMethod

log = logging.getLogger(__name__)


class CFSPStructure(StructureSpec):
    """Coarse-to-fine structured pruning (Wang et al., COLING 2025): per-block budgets from how much each block
    changes its input, then channels by a score from the FFN weights and activations."""
    method: Literal["cfsp"]
    a: float = Field(25.0, ge=0.0, description="slope of the sigmoid over the blocks' mean angular distance "
                     "(0: same budget for every block)")
    b: float = Field(1.0, ge=0.0, description="exponent of the activation norm inside the down-projection term")
    c: float = Field(1.0, ge=0.0, description="exponent of the activation norm multiplying the summed weight terms")
    max_keep: float = Field(1.0, gt=0.0, le=1.0, description="no block keeps more than this fraction of its channels")
    block_distance: list[float] | None = Field(None, description="per-block angular distances from an earlier run's "
                                               "report.json (stages[].details.block_distance): skips the dense pass, "
                                               "e.g. to try other targets")


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """arccos(cos(x_t, y_t)) / π per token (last dim = features), in [0, 1], float64."""
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    return torch.arccos(cos) / torch.pi


def coarse_keep(distance: list[float], target: float, a: float, max_keep: float = 1.0) -> list[float]:
    """Per-block keep ratios with mean exactly 1 − target, none above max_keep, increasing with distance."""
    keep_mean = 1.0 - target
    if max_keep < keep_mean:
        raise ValueError(f"max_keep {max_keep} is below the mean keep ratio {keep_mean:.4f}: raise max_keep")
    d = torch.tensor(distance, dtype=torch.float64)
    w = torch.sigmoid(a * (d - d.mean()))
    keep = w / w.mean() * keep_mean
    top = float(keep.max())
    if top > max_keep:
        keep = keep_mean + (keep - keep_mean) * ((max_keep - keep_mean) / (top - keep_mean))
    return keep.tolist()


def cfsp_scores(out_w: torch.Tensor, in_ws: list[torch.Tensor], sq_norm: torch.Tensor, b: float = 1.0,
                c: float = 1.0) -> torch.Tensor:
    """Fine-grained score per channel j (column j of out_w, row j of each in_w):
    (Σ_M n·mean_k |M_kj| / Σ_j' |M_kj'|)·‖x_j‖^c, M over |out_w|·‖x‖^b and each |in_wᵀ| (hidden × channels)."""
    act = sq_norm.double().sqrt().to(out_w.device)
    n = out_w.shape[1]
    # one term at a time, in place: a layer's three float64 terms at once were the peak of a streamed run
    terms = [lambda: out_w.abs().double().mul_(act[None, :] ** b)] + [lambda w=w: w.abs().double().T for w in in_ws]
    rel = None
    for term in terms:
        t = term()
        t = t.div_(t.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))
        rel = t if rel is None else rel.add_(t)
        del t
    return rel.mean(0) * n * act ** c


@torch.no_grad()
def block_distances(model, adapter, windows, device, batch_size: int, io=None) -> list[float]:
    """Mean angular distance between each dense block's input and output over the calibration tokens."""
    acts = capture(model, adapter, windows, device, batch_size)
    out = []
    for _, layer in walk_layers(model, adapter, device, io, "cfsp block importance"):
        total, tokens = 0.0, 0
        for b, (hidden, kw) in enumerate(zip(acts.hidden, acts.kwargs)):
            nxt = layer_forward(layer, hidden, kw)
            dist = angular_distance(hidden, nxt)
            total, tokens = total + float(dist.sum()), tokens + dist.numel()
            acts.hidden[b] = nxt
        acts.advance(layer, acts.hidden)
        out.append(total / tokens)
    return out


class CFSP(StructuredMethod):
    def __init__(self, spec):
        super().__init__(spec)
        self.distances: list[float] | None = spec.block_distance

    def column_scores(self, out_w, in_ws, sq_norm):
        return cfsp_scores(out_w, in_ws, sq_norm, self.spec.b, self.spec.c)

    def block_keep(self, model, adapter, windows, device, batch_size, target, io=None):
        n_layers = len(adapter.layers(model))
        if self.distances is not None and len(self.distances) != n_layers:
            raise ValueError(f"block_distance has {len(self.distances)} values for {n_layers} decoder layers; "
                             "take it from a run on the same model")
        if self.distances is None:  # one dense pass serves the FFN and the head budgets
            self.distances = block_distances(model, adapter, windows, device, batch_size, io)
        keep = coarse_keep(self.distances, target, self.spec.a, self.spec.max_keep)
        # relative importance: the IG-LoRA recovery gives each block adapter capacity in proportion
        w = torch.sigmoid(self.spec.a * (torch.tensor(self.distances, dtype=torch.float64) - sum(self.distances) / len(self.distances)))
        return keep, {"block_distance": self.distances, "block_weight": (w / w.mean()).tolist()}


register("structure", CFSPStructure, CFSP)
