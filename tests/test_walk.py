"""The one layer walk: every layer gets its own keyword arguments, as a plain forward passes them."""
import pytest
import torch

from conftest import tiny_model
from sparsellm.calibrate.walk import capture, walk_layers
from sparsellm.loading import get_adapter


def alternating_qwen2():
    """Qwen2 whose layers alternate sliding-window (4 tokens) and full attention: their masks differ."""
    types = ["sliding_attention", "full_attention"] * 2
    return tiny_model("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=4, layer_types=types)


def test_captured_inputs_equal_the_hidden_states_of_a_plain_forward_layer_by_layer(windows):
    model = alternating_qwen2()
    adapter = get_adapter(model)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    acts = capture(model, adapter, windows, "cpu", batch_size=3)
    masks = [kw[0]["attention_mask"] for kw in acts.per_layer]
    # the sliding layers' masks are not the full layers' (else this test would prove nothing)
    def same(a, b):
        return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))

    assert not same(masks[0], masks[1]) and same(masks[0], masks[2]) and same(masks[1], masks[3])
    with torch.no_grad():
        ref = [model(input_ids=b, output_hidden_states=True).hidden_states for b in windows.split(3)]
    n = len(adapter.layers(model))
    for index, layer in walk_layers(model, adapter, "cpu"):
        assert acts.index == index
        for b, h in enumerate(acts.hidden):
            torch.testing.assert_close(h, ref[b][index], rtol=0, atol=1e-5)
        if index + 1 < n:
            acts.advance(layer)


def test_reusing_layer_zeros_arguments_would_be_wrong(windows):
    """The failure the per-layer capture prevents: layer 1 (full attention) run with layer 0's sliding mask
    gives other outputs."""
    model = alternating_qwen2()
    adapter = get_adapter(model)
    acts = capture(model, adapter, windows, "cpu", batch_size=8)
    layer1 = adapter.layers(model)[1]
    acts.advance(adapter.layers(model)[0])
    right = acts.outputs(layer1)[0]
    wrong = acts.outputs(layer1, index=0)[0]
    assert not torch.allclose(right, wrong, atol=1e-3)


def test_capture_runs_no_decoder_layer(windows):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    calls = []
    for layer in adapter.layers(model):
        layer.self_attn.register_forward_pre_hook(lambda m, a: calls.append(m))
    capture(model, adapter, windows, "cpu", batch_size=4)
    assert calls == []  # the stubs stand in for every layer
    assert all("forward" not in layer.__dict__ for layer in adapter.layers(model))  # and are gone afterwards


def test_a_body_that_raises_leaves_the_layer_unreleased(windows):
    model = tiny_model("llama")
    adapter = get_adapter(model)

    class IO:
        def __init__(self):
            self.events = []

        def load(self, i, layer):
            self.events.append(("load", i))

        def release(self, i, layer):
            self.events.append(("release", i))

    io = IO()
    with pytest.raises(ValueError):
        for index, _ in walk_layers(model, adapter, "cpu", io):
            if index == 1:
                raise ValueError("boom")
    assert io.events == [("load", 0), ("release", 0), ("load", 1)]
