"""Mixture-of-experts layers for the per-Linear methods (Wanda, SparseGPT, N:M, DSnoT): each expert's
matrices as 2-D views of transformers' 3-D expert parameters, and each expert's input statistics from the
tokens the router sends to it. The engine (calibrate/engine.py) prunes them as it prunes Linears: see docs/moe.md.

Layout (transformers 5, Mixtral / Qwen2-MoE / Qwen3-MoE): `mlp.experts.gate_up_proj` is (E, 2·I, H) with
rows gate | up per expert, `mlp.experts.down_proj` is (E, H, I); the experts module is called as
`experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))` after the router, and expert e computes
down_e · (act(gate_e · x) ⊙ up_e · x) for its tokens, weighted by the routing weight afterwards. So a forward
pre-hook on the experts module sees both the tokens and where the router sends them."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .stats import InputStats

log = logging.getLogger(__name__)

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


def routed_tokens(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Indices of the tokens the router sends to `expert` (each once, in token order)."""
    return (top_k_index == expert).any(-1).nonzero().flatten()


class ExpertStats:
    """Per-expert input statistics of one experts module, from the routing each forward passes it:
    `inputs[e]` (what gate_proj and up_proj of expert e read: its routed hidden states) and `inner[e]` (what
    its down_proj reads: act(gate·x) ⊙ up·x, from the expert's current weights). `tokens[e]` counts them.
    The routing weights scale the expert's output, not these inputs, so they are not applied."""

    def __init__(self, experts: nn.Module, needs: frozenset[str], device: torch.device | str = "cpu",
                 inner: bool = True, inputs: bool = True):
        self.experts = experts
        self.count, hidden, inter = expert_shapes(experts)
        self.inputs = [InputStats(hidden, needs, device) for _ in range(self.count)] if inputs else None
        self.inner = [InputStats(inter, needs, device) for _ in range(self.count)] if inner else None
        self.tokens = [0] * self.count
        self._handle = None
        self._warned: set[int] = set()

    @torch.no_grad()
    def update(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        top_k_index = top_k_index.reshape(hidden.shape[0], -1)
        inter = self.experts.gate_up_proj.shape[1] // 2
        for e in range(self.count):
            idx = routed_tokens(top_k_index, e)
            if idx.numel() == 0:
                continue
            x = hidden[idx]
            self.tokens[e] += x.shape[0]
            if self.inputs is not None:
                self.inputs[e].update(x)
            if self.inner is not None:
                gate_up = self.experts.gate_up_proj[e]
                h = self.experts.act_fn(x @ gate_up[:inter].T.to(x.dtype)) * (x @ gate_up[inter:].T.to(x.dtype))
                self.inner[e].update(h)

    def record(self, module, args, kwargs):
        """Forward pre-hook of the experts module: accumulate the statistics of this call's routed tokens."""
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        self.update(hidden, top_k_index)

    def attach(self) -> "ExpertStats":
        self._handle = self.experts.register_forward_pre_hook(self.record, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def for_matrix(self, expert: int, part: str, min_tokens: int = 1, name: str = "") -> InputStats:
        """The statistics a method gets for expert `expert`'s `part`: its own, or data-free ones (see
        data_free_stats) when the router sent it fewer than `min_tokens` tokens, with a warning (once per expert)."""
        own = (self.inner if part == "down_proj" else self.inputs)[expert]
        if self.tokens[expert] >= max(min_tokens, 1):
            return own
        if expert not in self._warned:
            self._warned.add(expert)
            log.warning("%s: expert %d saw %d calibration tokens (< %d): data-free scores (magnitude) for its matrices",
                        name or "experts", expert, self.tokens[expert], min_tokens)
        return data_free_stats(own._sq.numel() if own._sq is not None else own._xtx.shape[0], own.needs,
                               (own._sq if own._sq is not None else own._xtx).device)


def data_free_stats(in_features: int, needs: frozenset[str], device: torch.device | str = "cpu") -> InputStats:
    """Statistics that make a method data-free: unit input norms (Wanda's |W|·‖x‖ becomes |W|, i.e. magnitude
    per row or per N:M group), identity Hessian (SparseGPT's OBS saliency becomes w², with no update of the
    remaining weights since H⁻¹ is diagonal) and zero mean (DSnoT sees no error to correct)."""
    s = InputStats(in_features, needs, device)
    s.tokens = s.sequences = 1
    if s._sq is not None:
        s._sq.fill_(1.0)
    if s._xtx is not None:
        s._xtx.copy_(torch.eye(in_features, dtype=torch.float64, device=s._xtx.device))
    return s
