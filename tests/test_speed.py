"""Throughput measurement: shapes of the result, interleaving, and that a KV-cache decode runs."""
import torch

from conftest import tiny_model
from sparsellm.evaluate.speed import compare_speed, measure_speed


def test_compare_speed_interleaves_and_reports_medians(monkeypatch):
    a, b = tiny_model("llama"), tiny_model("opt")
    order = []
    for name, m in (("a", a), ("b", b)):
        orig = m.forward

        def spy(*args, _name=name, _orig=orig, **kw):
            order.append(_name)
            return _orig(*args, **kw)

        monkeypatch.setattr(m, "forward", spy)
    r = compare_speed({"a": a, "b": b}, prefill_tokens=16, decode_prompt=4, decode_tokens=3, repeats=3, warmup=1)
    assert set(r) == {"a", "b"}
    for v in r.values():
        assert len(v["prefill_runs"]) == len(v["decode_runs"]) == 3
        assert v["prefill_tokens_per_s"] == sorted(v["prefill_runs"])[1] > 0
        assert v["decode_tokens_per_s"] == sorted(v["decode_runs"])[1] > 0
    # per repeat: a's prefill + decode prompt + 3 steps, then b's: alternating blocks of 5 calls
    assert order == (["a"] * 5 + ["b"] * 5) * 4


def test_measure_speed_single_model():
    r = measure_speed(tiny_model("qwen2"), prefill_tokens=8, decode_prompt=2, decode_tokens=2, repeats=1, warmup=0)
    assert r["prefill_tokens"] == 8 and r["decode_tokens"] == 2 and r["threads"] == torch.get_num_threads()
