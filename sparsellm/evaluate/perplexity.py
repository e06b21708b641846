"""Perplexity = exp(mean next-token NLL over all tokens of non-overlapping chunks): the WikiText-2
protocol of the Wanda and SparseGPT papers (a chunk's first token is never predicted).

The logits are never materialised for a whole batch: the last decoder layer's output goes through the
head (final norm, lm_head, the family's logit transform) a slice of positions at a time, at most
HEAD_ELEMENTS logits per slice, so the peak does not grow with batch x seqlen x vocabulary (4 chunks of
2048 tokens of a 152k vocabulary would be 5 GB of float32 logits, and as much again for the softmax)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

HEAD_ELEMENTS = 1 << 24  # logits per slice: 64 MiB in float32


class _HeadReached(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def last_hidden(model: torch.nn.Module, adapter, batch: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output for `batch` (the input of the first head module), computed by the
    model's own forward, which stops there: the head runs apart, in slices (nll_from_hidden)."""
    def stop(module, args):
        raise _HeadReached(args[0])

    handle = adapter.head_modules(model)[0].register_forward_pre_hook(stop)
    try:
        model(input_ids=batch, use_cache=False)
    except _HeadReached as reached:
        return reached.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"{type(model).__name__}'s forward never reached its head modules {adapter.head_paths}")


def nll_from_hidden(model: torch.nn.Module, adapter, hidden: torch.Tensor, batch: torch.Tensor,
                    max_elements: int = HEAD_ELEMENTS) -> tuple[float, int]:
    """Summed NLL of batch[:, 1:] from the last decoder layer's output `hidden` [B, T, H] at the positions
    before them, and the token count; the head (adapter.head_logits) runs on at most `max_elements`
    logits at a time (whole rows of one chunk, so every slice sees the same computation whatever the batch)."""
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else None
    rows = max(1, max_elements // vocab) if vocab else hidden.shape[1]
    total = 0.0
    for b in range(hidden.shape[0]):
        h, labels = hidden[b, :-1], batch[b, 1:].to(hidden.device)
        for s in range(0, h.shape[0], rows):
            logits = adapter.head_logits(model, h[s:s + rows][None])[0]
            total += F.cross_entropy(logits.float(), labels[s:s + rows], reduction="sum").item()
    return total, batch[:, 1:].numel()


@torch.no_grad()
def perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 4, device="cpu", desc: str = "perplexity",
               adapter=None) -> float:
    """Perplexity of `model` on `chunks` [n, seqlen] (`adapter`: the model's, looked up when None)."""
    if adapter is None:
        from ..loading import get_adapter

        adapter = get_adapter(model)
    nll, count = 0.0, 0
    for batch in tqdm(chunks.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        n, c = nll_from_hidden(model, adapter, last_hidden(model, adapter, batch), batch)
        nll, count = nll + n, count + c
    return math.exp(nll / count)
