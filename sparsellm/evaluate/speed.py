"""Prefill and decode throughput of a causal LM on one device (warm-up, then the median of repeats)."""
from __future__ import annotations

import inspect
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Bench:
    """Prefill: one forward over `prefill_tokens` tokens (batch 1, KV cache built). Decode: greedy
    steps of one token with the KV cache after a `decode_prompt`-token prompt. Token ids are random:
    throughput does not depend on them."""

    def __init__(self, device, prefill_tokens: int, decode_prompt: int, decode_tokens: int, vocab: int, seed: int):
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(0, vocab, (1, prefill_tokens), generator=gen).to(self.device)
        self.short = self.prompt[:, :decode_prompt]
        self.decode_tokens = decode_tokens

    @torch.no_grad()
    def prefill(self, model) -> float:
        _sync(self.device)
        t = time.perf_counter()
        model(input_ids=self.prompt, use_cache=True)
        _sync(self.device)
        return self.prompt.shape[1] / (time.perf_counter() - t)

    @torch.no_grad()
    def decode(self, model) -> float:
        # transformers renamed past_key_values to cache (5.x); accept either
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(input_ids=self.short, use_cache=True)
        cache, tok = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(self.decode_tokens):
            out = model(input_ids=tok, use_cache=True, **{key: cache})
            cache, tok = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        return self.decode_tokens / (time.perf_counter() - t)


def compare_speed(models: dict, device="cpu", prefill_tokens: int = 512, decode_prompt: int = 64,
                  decode_tokens: int = 64, repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict:
    """Prefill and decode tokens/s of several models (e.g. dense and compressed), interleaved repeat
    by repeat so that drifting machine load hits all of them alike; medians plus every repeat."""
    vocab = min(m.config.vocab_size for m in models.values())
    bench = _Bench(device, prefill_tokens, decode_prompt, decode_tokens, vocab, seed)
    runs = {name: {"prefill": [], "decode": []} for name in models}
    for m in models.values():
        m.eval()
    for r in range(warmup + repeats):
        for name, m in models.items():
            pre, dec = bench.prefill(m), bench.decode(m)
            if r >= warmup:
                runs[name]["prefill"].append(pre)
                runs[name]["decode"].append(dec)
    return {name: {"prefill_tokens_per_s": statistics.median(v["prefill"]),
                   "decode_tokens_per_s": statistics.median(v["decode"]),
                   "prefill_runs": v["prefill"], "decode_runs": v["decode"], "prefill_tokens": prefill_tokens,
                   "decode_prompt": decode_prompt, "decode_tokens": decode_tokens, "repeats": repeats,
                   "device": str(bench.device), "threads": torch.get_num_threads()}
            for name, v in runs.items()}


def measure_speed(model, device="cpu", **kwargs) -> dict:
    """compare_speed for one model."""
    return compare_speed({"model": model}, device, **kwargs)["model"]
