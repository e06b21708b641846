"""The perplexity's head in slices: the same NLL as the logits of the whole batch, on every family's
logit transform, without ever holding a batch's logits."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from test_families import family_model
from sparsellm.evaluate.perplexity import last_hidden, nll_from_hidden, perplexity
from sparsellm.loading import get_adapter


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma2", "granite", "gemma3_text"])
def test_sliced_head_equals_the_whole_logits(arch):
    """Gemma 2 soft-caps its logits and Granite divides them: the slices apply the same transform. With
    max_elements below one row of logits, every position is its own slice."""
    model = tiny_model(arch).eval() if arch in ("llama", "opt") else family_model(arch)
    adapter = get_adapter(model)
    batch = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), batch[:, 1:].reshape(-1), reduction="sum")
        hidden = last_hidden(model, adapter, batch)
        for max_elements in (1, 5 * model.config.vocab_size, 10**9):
            got, count = nll_from_hidden(model, adapter, hidden, batch, max_elements)
            assert count == 3 * 16
            assert got == pytest.approx(float(want), rel=1e-5)
    assert perplexity(model, batch, batch_size=2) == pytest.approx(math.exp(float(want) / 48), rel=1e-5)


def test_logits_are_never_whole(monkeypatch):
    """No call of the head sees more than max_elements logits' worth of positions."""
    model = tiny_model("llama").eval()
    adapter = get_adapter(model)
    seen = []
    real = type(adapter).head_logits
    monkeypatch.setattr(type(adapter), "head_logits", lambda self, m, h: seen.append(h.shape[1]) or real(self, m, h))
    batch = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll_from_hidden(model, adapter, last_hidden(model, adapter, batch), batch, 8 * model.config.vocab_size)
    assert seen == [8, 8, 8, 8] * 2  # 32 predicting positions per chunk, 8 rows a slice
