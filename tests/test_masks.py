import pytest
import torch

from sparsellm.compress.masks import count_to_prune, layer_mask, nm_mask, row_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.99])
def test_row_mask_prunes_exact_count_per_row(sparsity):
    scores = torch.rand(13, 40, generator=torch.Generator().manual_seed(0))
    mask = row_mask(scores, sparsity)
    assert (mask.sum(1) == int(40 * sparsity)).all()


def test_row_mask_prunes_the_lowest_scores():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 9.0, 0.1, 7.0]])
    expected = torch.tensor([[False, True, False, True], [True, False, True, False]])
    assert torch.equal(row_mask(scores, 0.5), expected)


def test_row_mask_with_ties_still_exact():
    mask = row_mask(torch.ones(3, 10), 0.5)
    assert (mask.sum(1) == 5).all()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_layer_mask_exact_total(sparsity):
    scores = torch.randn(7, 33, generator=torch.Generator().manual_seed(1))
    mask = layer_mask(scores, sparsity)
    assert mask.sum() == int(7 * 33 * sparsity)
    # everything pruned scores no higher than everything kept
    assert scores[mask].max() <= scores[~mask].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_exact_per_group(n, m):
    scores = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(scores, n, m)
    assert (mask.view(6, -1, m).sum(-1) == n).all()


def test_nm_mask_hand_case():
    scores = torch.tensor([[1.0, 5.0, 2.0, 4.0, 8.0, 7.0, 6.0, 0.0]])
    expected = torch.tensor([[True, False, True, False, False, False, True, True]])
    assert torch.equal(nm_mask(scores, 2, 4), expected)


def test_nm_mask_rejects_width_not_divisible():
    with pytest.raises(ValueError, match="does not divide"):
        nm_mask(torch.rand(2, 10), 2, 4)


def test_count_to_prune_blocks_add_up_to_total():
    total, s = 1000, 0.37
    blocks = [(i, min(i + 128, total)) for i in range(0, total, 128)]
    assert sum(count_to_prune(total, s, a, b) for a, b in blocks) == int(total * s)
