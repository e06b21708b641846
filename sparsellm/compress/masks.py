"""Pure mask functions over score tensors. Convention: True marks a weight to prune (set to zero).
Lower score = less important. Counts are exact: selection is top-k, never a threshold, so ties
(common in quantized checkpoints) cannot push a row or group past its count."""
from __future__ import annotations

import torch


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries in each row of a 2-D tensor."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune floor(sparsity * columns) entries in every row (the output-wise comparison group of Wanda)."""
    return _lowest(scores, int(scores.shape[1] * sparsity))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune floor(sparsity * numel) entries of the whole matrix."""
    return _lowest(scores.reshape(1, -1), int(scores.numel() * sparsity)).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune exactly n entries in every group of m consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern with M={m} does not divide the input width {cols}")
    groups = scores.reshape(rows * cols // m, m)
    return _lowest(groups, n).view(rows, cols)


def count_to_prune(total: int, sparsity: float, start: int, stop: int) -> int:
    """How many of the units [start, stop) of `total` to prune so that every prefix, and the whole,
    gets floor(sparsity * size): blocks chosen this way add up exactly to the layer's count."""
    return int(stop * sparsity) - int(start * sparsity)
