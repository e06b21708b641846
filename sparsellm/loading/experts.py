"""Mixture-of-experts parameters as matrices: transformers 5 keeps an MoE layer's experts as 3-D parameters
(`mlp.experts.gate_up_proj` (E, 2·I, H), rows gate | up per expert; `mlp.experts.down_proj` (E, H, I));
here each expert's matrix is a 2-D view (what the per-Linear methods, the counts and the bitmask export
work on), and the fused parameters are split into and rebuilt from the 2-D tensors save_pretrained writes.
Pure structure, no statistics (those are in calibrate/experts.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PARTS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ExpertMatrix:
    """One expert's matrix as a Linear-like object for compress.base.Target: `weight` is a view of the 3-D
    parameter (rows = outputs), so a method's in-place edits (masked_fill_, copy_) change the model."""

    weight: torch.Tensor
    bias: None = None
    expert: int = 0  # which expert, and which of its matrices ("gate_proj", "up_proj", "down_proj")
    part: str = "gate_proj"

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def expert_shapes(experts: nn.Module) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a fused experts module; ValueError for another layout."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        raise ValueError(f"{type(experts).__name__}: expected 3-D gate_up_proj (E, 2I, H) and down_proj (E, H, I)")
    e, two_i, h = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
        raise ValueError(f"{type(experts).__name__}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                         f"{tuple(down.shape)} are not (E, 2I, H) and (E, H, I)")
    return e, h, two_i // 2


def expert_matrices(experts: nn.Module, prefix: str = "") -> dict[str, ExpertMatrix]:
    """{"<prefix>.<e>.gate_proj" | "up_proj" | "down_proj": view} for every expert e, in expert order."""
    e_count, _, inter = expert_shapes(experts)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()  # detach shares the storage
    stem = f"{prefix}." if prefix else ""
    out = {}
    for e in range(e_count):
        out[f"{stem}{e}.gate_proj"] = ExpertMatrix(gate_up[e, :inter], expert=e, part="gate_proj")
        out[f"{stem}{e}.up_proj"] = ExpertMatrix(gate_up[e, inter:], expert=e, part="up_proj")
        out[f"{stem}{e}.down_proj"] = ExpertMatrix(down[e], expert=e, part="down_proj")
    return out


# ---- on disk: transformers' save_pretrained writes every expert's matrices as 2-D tensors ----------------

def stored_parts(leaf: str) -> tuple[str, ...]:
    """The matrices a fused parameter holds per expert, in the order fuse_stored takes them."""
    return ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)


def fuse_stored(leaf: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The fused parameter `leaf` ("gate_up_proj" or "down_proj") from each expert's stored 2-D matrices, in
    expert order and stored_parts order within an expert: gate_up_proj[e] is gate_e above up_e."""
    n = len(stored_parts(leaf))
    return torch.stack([torch.cat(tensors[i:i + n]) for i in range(0, len(tensors), n)])


def split_stored(leaf: str, fused: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of fuse_stored: each expert's matrices as row views of the fused parameter."""
    if leaf == "gate_up_proj":
        inter = fused.shape[1] // 2
        return [m for e in range(fused.shape[0]) for m in (fused[e, :inter], fused[e, inter:])]
    return list(fused)
