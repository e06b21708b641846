"""Prefill and decode throughput of a causal LM on one device (warm-up, then the median of repeats)."""
from __future__ import annotations

import inspect
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model, device="cpu", prefill_tokens: int = 512, decode_prompt: int = 64, decode_tokens: int = 64,
                  repeats: int = 5, warmup: int = 1, vocab: int | None = None, seed: int = 0) -> dict:
    """Prefill: one forward over `prefill_tokens` tokens (batch 1, KV cache built). Decode: greedy
    steps of one token with the KV cache after a `decode_prompt`-token prompt. Token ids are random
    (throughput does not depend on them); returns tokens/s medians and every repeat's value."""
    device = torch.device(device)
    vocab = vocab or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prefill_tokens), generator=gen).to(device)
    short = prompt[:, :decode_prompt]

    def prefill() -> float:
        _sync(device)
        t = time.perf_counter()
        model(input_ids=prompt, use_cache=True)
        _sync(device)
        return prefill_tokens / (time.perf_counter() - t)

    # transformers renamed past_key_values to cache (5.x); accept either
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def decode() -> float:
        out = model(input_ids=short, use_cache=True)
        cache, tok = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(device)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=tok, use_cache=True, **{key: cache})
            cache, tok = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(device)
        return decode_tokens / (time.perf_counter() - t)

    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            prefill(), decode()
        pre = [prefill() for _ in range(repeats)]
        dec = [decode() for _ in range(repeats)]
    finally:
        model.train(was_training)
    return {"prefill_tokens_per_s": statistics.median(pre), "decode_tokens_per_s": statistics.median(dec),
            "prefill_runs": pre, "decode_runs": dec, "prefill_tokens": prefill_tokens,
            "decode_prompt": decode_prompt, "decode_tokens": decode_tokens, "repeats": repeats, "device": str(device)}
