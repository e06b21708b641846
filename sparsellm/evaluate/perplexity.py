"""Perplexity = exp(mean next-token NLL over all tokens of non-overlapping chunks): the WikiText-2
protocol of the Wanda and SparseGPT papers (a chunk's first token is never predicted)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 4, device="cpu", desc: str = "perplexity") -> float:
    nll, count = 0.0, 0
    for batch in tqdm(chunks.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        n, c = nll_sum(model(input_ids=batch, use_cache=False).logits[:, :-1], batch)
        nll, count = nll + n, count + c
    return math.exp(nll / count)


def nll_sum(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of batch[:, 1:] under logits of the positions before them, and the token count."""
    labels = batch[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
    return loss.item(), labels.numel()
