"""Running statistics of a Linear layer's inputs, accumulated in float64 whatever the model dtype."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

KNOWN = frozenset({"sq_norm", "hessian", "mean"})


class InputStats:
    def __init__(self, in_features: int, needs: frozenset[str], device: torch.device | str = "cpu"):
        unknown = set(needs) - KNOWN
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}")
        self.needs = needs
        self.tokens = 0
        self.sequences = 0
        f64 = dict(dtype=torch.float64, device=device)
        self._sq = torch.zeros(in_features, **f64) if needs & {"sq_norm", "mean"} else None
        self._sum = torch.zeros(in_features, **f64) if "mean" in needs else None
        self._xtx = torch.zeros(in_features, in_features, **f64) if "hessian" in needs else None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        self.sequences += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self._sq is not None:
            self._sq += (x * x).sum(0).double()
        if self._sum is not None:
            self._sum += x.sum(0).double()
        if self._xtx is not None:
            self._xtx += (x.T @ x).double()

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self._sq, self._sum, self._xtx) if t is not None)

    @property
    def sq_norm(self) -> torch.Tensor:
        """Mean of x_j² over tokens, per input channel (Wanda's ‖X_j‖² up to a constant)."""
        return self._sq / self.tokens

    @property
    def mean(self) -> torch.Tensor:
        return self._sum / self.tokens

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_norm - self.mean ** 2).clamp_min(0)

    @property
    def hessian(self) -> torch.Tensor:
        """XᵀX / tokens."""
        return self._xtx / self.tokens


@dataclass
class Target:
    """One Linear being compressed: its full name, decoder-layer index, the module, the statistics
    of its inputs, and (for methods with needs_dense) its weights before this pass touched them."""

    name: str
    layer: int
    linear: nn.Linear
    stats: InputStats | None = None
    dense: torch.Tensor | None = None
