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
import torch
from torch import nn

from ..loading.experts import expert_shapes
from .stats import InputStats

log = logging.getLogger(__name__)

def routed_tokens(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Indices of the tokens the router sends to `expert` (each once, in token order)."""
    return (top_k_index == expert).any(-1).nonzero().flatten()


class ExpertStats:
    """Per-expert input statistics of one experts module, from the routing each forward passes it:
    `inputs[e]` (what gate_proj and up_proj of expert e read: its routed hidden states) and `inner[e]` (what
    its down_proj reads: act(gate·x) ⊙ up·x, from the expert's current weights). `tokens[e]` counts them.
    The routing weights scale the expert's output, not these inputs, so they are not applied.
    `only`: collect for these experts alone (the engine takes large experts' XᵀX a few experts at a time);
    the others keep None statistics and count no tokens."""

    def __init__(self, experts: nn.Module, needs: frozenset[str], device: torch.device | str = "cpu",
                 inner: bool = True, inputs: bool = True, only: set[int] | None = None):
        self.experts = experts
        self.count, hidden, inter = expert_shapes(experts)
        self.only = set(range(self.count)) if only is None else set(only)
        mine = [e in self.only for e in range(self.count)]
        self.inputs = [InputStats(hidden, needs, device) if m else None for m in mine] if inputs else None
        self.inner = [InputStats(inter, needs, device) if m else None for m in mine] if inner else None
        self.tokens = [0] * self.count
        self._handle = None
        self._warned: set[int] = set()

    @torch.no_grad()
    def update(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        top_k_index = top_k_index.reshape(hidden.shape[0], -1)
        inter = self.experts.gate_up_proj.shape[1] // 2
        for e in sorted(self.only):
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
