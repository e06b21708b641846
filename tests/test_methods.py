"""Method math on single layers: hand-computed Wanda, exact SparseGPT patterns, reconstruction error."""
import pytest
import torch

from sparsellm.calibrate.stats import InputStats
from sparsellm.compress.magnitude import magnitude_mask
from sparsellm.compress.sparsegpt import sparsegpt_prune
from sparsellm.compress.wanda import wanda_mask


def test_wanda_mask_matches_hand_computation():
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                      [-4.0, 1.0, 0.2, 1.0]])
    # input channel norms: sqrt of mean squares = [2, 1, 0.5, 4]
    sq = torch.tensor([4.0, 1.0, 0.25, 16.0])
    # scores row 0: [2, 2, 1.5, 2] -> prune the 2 lowest: col 2, then the first of the tied 2s is
    # ambiguous, so use row 1 for the tie-free check and row 0 for 1 pruned weight at 25 %.
    # scores row 1: [8, 1, 0.1, 4] -> 50 %: cols 1 and 2
    mask50 = wanda_mask(W, sq, 0.5, None)
    assert mask50[1].tolist() == [False, True, True, False]
    mask25 = wanda_mask(W, sq, 0.25, None)
    assert mask25.tolist() == [[False, False, True, False], [False, False, True, False]]
    # magnitude alone would prune differently in row 0 (0.5 is the smallest |W|)
    assert magnitude_mask(W, 0.25, None, "row")[0].tolist() == [False, False, False, True]


def test_wanda_nm_hand_case():
    W = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, -1.0, 3.0, 0.1]])
    sq = torch.tensor([1.0, 4.0, 9.0, 16.0, 1.0, 1.0, 1.0, 1.0])  # norms 1,2,3,4,1,1,1,1
    assert wanda_mask(W, sq, 0.5, (2, 4)).tolist() == [[True, True, False, False, False, True, False, True]]


def _correlated_inputs(cols: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, cols // 4, generator=g)
    mix = torch.randn(cols // 4, cols, generator=g)
    scale = torch.rand(cols, generator=g) * 3 + 0.1
    return (base @ mix + 0.3 * torch.randn(tokens, cols, generator=g)) * scale


def _layer_stats(X: torch.Tensor) -> InputStats:
    s = InputStats(X.shape[1], frozenset({"sq_norm", "hessian"}))
    for chunk in X.split(512):
        s.update(chunk)
    return s


def _recon_error(W, W_hat, X):
    return torch.linalg.norm(X @ W.T - X @ W_hat.T).item()


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(nm):
    torch.manual_seed(0)
    W = torch.randn(48, 256)
    X = _correlated_inputs(256)
    stats = _layer_stats(X)
    W_sgpt, mask = sparsegpt_prune(W, stats.hessian, 0.5, nm, blocksize=64)
    W_wanda = W.masked_fill(wanda_mask(W, stats.sq_norm, 0.5, nm), 0)
    W_mag = W.masked_fill(magnitude_mask(W, 0.5, nm, "layer"), 0)
    e_s, e_w, e_m = (_recon_error(W, w, X) for w in (W_sgpt, W_wanda, W_mag))
    assert e_s < e_w < e_m
    assert torch.equal(W_sgpt == 0, mask)


def test_sparsegpt_exact_patterns():
    W = torch.randn(16, 200)
    H = _layer_stats(_correlated_inputs(200, 512)).hessian
    _, m = sparsegpt_prune(W, H, 0.5, (2, 4), blocksize=64)
    assert (m.view(16, -1, 4).sum(-1) == 2).all()
    _, m = sparsegpt_prune(W, H, 0.6, None, blocksize=64, scope="block")
    assert m.sum() == int(16 * 200 * 0.6)
    _, m = sparsegpt_prune(W, H, 0.6, None, blocksize=64, scope="row")
    assert (m.sum(1) == int(200 * 0.6)).all()


def test_sparsegpt_zero_sparsity_keeps_weights():
    W = torch.randn(8, 64)
    H = _layer_stats(_correlated_inputs(64, 256)).hessian
    W2, m = sparsegpt_prune(W, H, 0.0)
    assert not m.any()
    assert torch.equal(W2, W)


def test_sparsegpt_handles_dead_inputs():
    W = torch.randn(8, 64)
    X = _correlated_inputs(64, 256)
    X[:, 5] = 0
    W2, _ = sparsegpt_prune(W, _layer_stats(X).hessian, 0.5)
    assert torch.isfinite(W2).all() and (W2[:, 5] == 0).all()


def test_input_stats_float64_and_values():
    s = InputStats(3, frozenset({"sq_norm", "hessian", "mean"}))
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, -2.0, 1.0]], dtype=torch.bfloat16)
    s.update(x)
    assert s.sq_norm.dtype == torch.float64
    assert torch.allclose(s.sq_norm, torch.tensor([5.0, 4.0, 0.5], dtype=torch.float64))
    assert torch.allclose(s.mean, torch.tensor([2.0, 0.0, 0.5], dtype=torch.float64))
    assert torch.allclose(s.var, torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64))
    xf = x.double()
    assert torch.allclose(s.hessian, xf.T @ xf / 2)
