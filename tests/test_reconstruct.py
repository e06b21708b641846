"""Reconstruction of the kept weights: the exact masked least-squares refit (hand cases, optimality)
and block reconstruction on a tiny model (masks exact, error lower, deterministic)."""
import copy

import pytest
import torch

from sparsellm.compress.magnitude import magnitude_mask
from sparsellm.compress.sparsegpt import sparsegpt_prune
from sparsellm.recover.reconstruct import masked_lstsq_refit, reconstruct_block, refit_error


def test_refit_hand_case():
    # H = [[2, 1], [1, 2]], w0 = (1, 1), column 1 pruned: w_0 = (H w0)_0 / H_00 = 3 / 2.
    # error (w0 − w)ᵀ H (w0 − w): d = (−0.5, 1) -> 2·0.25 − 2·0.5 + 2 = 1.5, below the 2 of keeping w0_0 = 1
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    for solver in ("cholesky", "cg"):
        w = masked_lstsq_refit(torch.tensor([[1.0, 1.0]]), torch.tensor([[False, True]]), H, damp=0.0, solver=solver)
        assert torch.allclose(w, torch.tensor([[1.5, 0.0]]), rtol=0, atol=1e-6) and w[0, 1] == 0, solver
        assert abs(refit_error(torch.tensor([[1.0, 1.0]]), w, H).item() - 1.5) < 1e-6


def test_refit_identity_hessian_keeps_the_dense_values():
    # uncorrelated unit inputs: nothing to compensate, the kept weights keep their dense values (damping cancels)
    D = torch.randn(5, 8)
    mask = magnitude_mask(D, 0.5, None, "row")
    for solver in ("cholesky", "cg"):
        assert torch.allclose(masked_lstsq_refit(D, mask, torch.eye(8), solver=solver), D.masked_fill(mask, 0), atol=1e-6)


def _problem(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, cols, generator=g) @ torch.randn(cols, cols, generator=g) + torch.randn(cols, generator=g)
    return torch.randn(rows, cols, generator=g), X.T @ X / 512


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_refit_is_the_masked_optimum(nm):
    D, H = _problem(12, 32, 1)
    start, mask = sparsegpt_prune(D, H, 0.5, nm, blocksize=16)
    if nm is None:  # uneven kept counts per row (the padded path)
        mask[0, :20] = True
        mask[1, :] = False
        mask[2, :] = True
    w = masked_lstsq_refit(D, mask, H, damp=0.0, solver="cholesky")
    assert torch.equal(w == 0, mask)  # zeros exactly where pruned
    # first-order optimality on the kept columns: (H (w − w0))_S = 0
    grad = (w.double() - D.double()) @ H.double()
    assert float(grad.masked_fill(mask, 0).abs().max()) < 1e-3
    if nm is None:  # nothing pruned: the dense row; everything pruned: zeros
        assert torch.allclose(w[1], D[1], atol=1e-4) and bool((w[2] == 0).all())
    # never worse than SparseGPT's weights on the same mask, and strictly better on most rows
    e_refit, e_sgpt = refit_error(D, w, H), refit_error(D, start.masked_fill(mask, 0), H)
    assert bool((e_refit <= e_sgpt * (1 + 1e-6)).all()) and int((e_refit < 0.999 * e_sgpt).sum()) > 6
    # brute force: row 3 solved on its own
    S = (~mask[3]).nonzero().squeeze(1)
    ref = torch.linalg.solve(H.double()[S][:, S], (H.double() @ D[3].double())[S])
    assert torch.allclose(w[3, S].double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_refit_cg_converges_to_the_exact_solution_and_never_worsens_a_row(nm):
    D, H = _problem(16, 32, 2)
    start, mask = sparsegpt_prune(D, H, 0.5, nm, blocksize=16)
    exact = masked_lstsq_refit(D, mask, H, damp=0.01, solver="cholesky")
    A = H.double() + 0.01 * torch.diagonal(H.double()).mean() * torch.eye(32, dtype=torch.float64)
    e_start, e_exact = refit_error(D, start, A), refit_error(D, exact, A)
    prev = e_start
    for iters in (1, 3, 10, 64):
        w = masked_lstsq_refit(D, mask, H, damp=0.01, solver="cg", iters=iters, start=start)
        assert torch.equal(w == 0, mask)
        e = refit_error(D, w, A)
        assert bool((e <= e_start).all()) and bool((e >= e_exact * (1 - 1e-5)).all())
        assert float(e.sum()) <= float(prev.sum()) * (1 + 1e-6)  # more steps, lower error
        prev = e
    assert torch.allclose(w, exact, rtol=1e-3, atol=1e-4)


def test_refit_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        masked_lstsq_refit(torch.ones(2, 4), torch.zeros(2, 3, dtype=torch.bool), torch.eye(4))
    with pytest.raises(ValueError, match="solver"):
        masked_lstsq_refit(torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.bool), torch.eye(4), solver="lu")


# --- block reconstruction on a tiny model ------------------------------------------------------------

def _block_problem(windows, nm=None, sparsity=0.5):
    from conftest import tiny_model
    from sparsellm.calibrate.engine import target_linears
    from sparsellm.calibrate.walk import capture
    from sparsellm.calibrate import make_selector
    from sparsellm.loading import get_adapter

    model = tiny_model("llama")
    adapter = get_adapter(model)
    acts = capture(model, adapter, windows, "cpu", 2)  # 8 windows -> 4 batches
    dense = adapter.layers(model)[0]
    with torch.no_grad():
        targets = [dense(h, **kw)[0] if isinstance(dense(h, **kw), tuple) else dense(h, **kw) for h, kw in zip(acts.hidden, acts.kwargs)]
    block = copy.deepcopy(dense)
    masks = {}
    for name, lin in target_linears(block, "", make_selector([], [])).items():
        mask = magnitude_mask(lin.weight, sparsity, nm, "row")
        with torch.no_grad():
            lin.weight.masked_fill_(mask, 0)
        masks[name] = mask
    return block, masks, acts, targets


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reconstruction_lowers_block_error_and_keeps_masks(windows, nm):
    block, masks, acts, targets = _block_problem(windows, nm)
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    r = reconstruct_block(block, masks, acts.hidden, acts.kwargs, targets, epochs=6, lr=1e-3, holdout=1)
    assert r.heldout_after < 0.9 * r.heldout_before and r.train_after < 0.9 * r.train_before
    assert r.best_epoch >= 1 and r.steps == 3 * r.epochs
    for name, mask in masks.items():
        w = block.get_submodule(name).weight
        assert bool((w[mask] == 0).all()) and bool((w[~mask] != 0).all()), name  # the mask, exactly
        if nm:
            assert bool(((w == 0).view(w.shape[0], -1, 4).sum(2) == 2).all()), name
        assert not torch.equal(w, before[f"{name}.weight"]), name  # kept weights were trained
    # norm scales are trained too; nothing is left requiring grad
    assert not torch.equal(block.input_layernorm.weight, before["input_layernorm.weight"])
    assert not any(p.requires_grad for p in block.parameters())


def test_reconstruction_is_deterministic(windows):
    block, masks, acts, targets = _block_problem(windows, None, 0.6)
    twin = copy.deepcopy(block)
    a = reconstruct_block(block, masks, acts.hidden, acts.kwargs, targets, epochs=3, lr=1e-3)
    b = reconstruct_block(twin, masks, acts.hidden, acts.kwargs, targets, epochs=3, lr=1e-3)
    assert a.heldout_after == b.heldout_after
    for (n, p), (_, q) in zip(block.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), n


def test_reconstruction_keeps_the_start_when_nothing_helps(windows):
    block, masks, acts, targets = _block_problem(windows)
    start = {n: p.detach().clone() for n, p in block.named_parameters()}
    # a learning rate so large that every epoch makes the held-back error worse: the start is kept
    r = reconstruct_block(block, masks, acts.hidden, acts.kwargs, targets, epochs=3, lr=10.0, patience=1, grad_clip=None)
    assert r.best_epoch == 0 and r.heldout_after == r.heldout_before and r.epochs == 1
    for n, p in block.named_parameters():
        assert torch.equal(p, start[n]), n


def test_reconstruction_rejects_bad_input(windows):
    block, masks, acts, targets = _block_problem(windows)
    with pytest.raises(ValueError, match="names no Linear"):
        reconstruct_block(block, {"nope": masks["mlp.up_proj"]}, acts.hidden, acts.kwargs, targets)
    with pytest.raises(ValueError, match="holdout"):
        reconstruct_block(block, masks, acts.hidden, acts.kwargs, targets, holdout=4)
    bad = {**masks, "mlp.up_proj": ~masks["mlp.up_proj"]}
    with pytest.raises(ValueError, match="not zero"):
        reconstruct_block(block, bad, acts.hidden, acts.kwargs, targets)


def test_reconstruct_parts_attention_then_mlp(windows):
    from sparsellm.recover.reconstruct import reconstruct_parts

    block, masks, acts, targets = _block_problem(windows)
    from conftest import tiny_model
    from sparsellm.loading import get_adapter

    dense_block = get_adapter(tiny_model("llama")).layers(tiny_model("llama"))[0]

    def block_mse():
        with torch.no_grad():
            return sum(float(((block(h, **kw)[0] if isinstance(block(h, **kw), tuple) else block(h, **kw)) - y).pow(2).mean())
                       for h, kw, y in zip(acts.hidden, acts.kwargs, targets))

    before = block_mse()
    res = reconstruct_parts(block, dense_block, masks, acts.hidden, acts.kwargs, epochs=6, lr=1e-3)
    assert set(res) == {"self_attn", "mlp"}
    for part, r in res.items():
        assert r.heldout_after < r.heldout_before and r.best_epoch >= 1, part
    assert block_mse() < 0.9 * before
    for name, mask in masks.items():
        w = block.get_submodule(name).weight
        assert bool((w[mask] == 0).all()) and bool((w[~mask] != 0).all()), name


def test_sparsegpt_refit_option_in_a_layerwise_pass(windows):
    """SparseGPT with `refit: true`: layer 0 (same inputs either way) gets SparseGPT's mask exactly and a
    calibration output error no higher in any row; the default (no refit) is unchanged."""
    from conftest import tiny_model
    from sparsellm.calibrate import make_selector, run_layerwise
    from sparsellm.calibrate.engine import collect_stats, target_linears
    from sparsellm.calibrate.walk import capture
    from sparsellm.compress.sparsegpt import SparseGPT
    from sparsellm.loading import get_adapter
    from sparsellm.recipe import recipe_from_dict

    def spec(**kw):
        return recipe_from_dict({"stages": [{"prune": {"method": "sparsegpt", "pattern": "2:4", **kw}}]}).stages[0].spec

    assert spec().refit is False and spec(refit=True).refit is True  # the recipe field; off by default (the paper)
    dense, plain, refit = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    adapter = get_adapter(dense)
    sel = make_selector([], [])
    run_layerwise(plain, adapter, windows, [SparseGPT(spec())], sel, batch_size=4)
    run_layerwise(refit, adapter, windows, [SparseGPT(spec(refit=True))], sel, batch_size=4)
    acts = capture(dense, adapter, windows, "cpu", 4)
    layer0 = adapter.layers(dense)[0]
    linears = target_linears(layer0, "", sel)
    stats = collect_stats(layer0, linears, {n: frozenset({"hessian"}) for n in linears}, acts)
    prefix = adapter.layer_prefix(0)
    for name, lin in linears.items():
        p = plain.get_submodule(f"{prefix}.{name}").weight
        f = refit.get_submodule(f"{prefix}.{name}").weight
        assert torch.equal(p == 0, f == 0), name
        H = stats[name].hessian
        assert bool((refit_error(lin.weight, f, H) <= refit_error(lin.weight, p, H) * (1 + 1e-5)).all()), name
        assert float(refit_error(lin.weight, f, H).sum()) < 0.99 * float(refit_error(lin.weight, p, H).sum()), name


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_refit_to_the_dense_inputs(solver):
    """With cross = X_sᵀX_d / n the refit fits the dense inputs' outputs: brute-force least squares
    on the kept columns of ||X_s w − X_d w0||² (no damping), and cross = H gives the plain refit."""
    g = torch.Generator().manual_seed(3)
    n, cols = 400, 12
    Xd = torch.randn(n, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    Xs = Xd + 0.3 * torch.randn(n, cols, generator=g, dtype=torch.float64)  # the pruned model's inputs drift
    D = torch.randn(3, cols, generator=g)
    mask = magnitude_mask(D, 0.5, (2, 4), "row")
    H, C = Xs.T @ Xs / n, Xs.T @ Xd / n
    w = masked_lstsq_refit(D, mask, H, damp=0.0, solver=solver, cross=C, iters=200)
    for row in range(3):
        S = (~mask[row]).nonzero().squeeze(1)
        ref = torch.linalg.lstsq(Xs[:, S], Xd @ D[row].double()).solution
        assert torch.allclose(w[row, S].double(), ref, rtol=1e-3, atol=1e-4), row
    plain = masked_lstsq_refit(D, mask, H, damp=0.01, solver=solver)
    assert torch.allclose(masked_lstsq_refit(D, mask, H, damp=0.01, solver=solver, cross=H), plain, atol=1e-6)


def test_tensor_scales_hand_case():
    from torch import nn

    from sparsellm.recover.reconstruct import tensor_scales, trainable_parameters

    block = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with torch.no_grad():
        block[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # kept entries 3 and 4: rms sqrt(12.5)
        block[0].bias.zero_()  # all zero: borrows its weight's size
        block[1].weight.copy_(torch.tensor([1.0, 7.0]))  # rms 5
        block[1].bias.zero_()  # a norm shift, all zero: 1
    masks = {"0": block[0].weight == 0}
    params = trainable_parameters(block, masks)
    scales = tensor_scales(block, params, {"0.weight": masks["0"]})
    assert scales == pytest.approx({"0.weight": 12.5 ** 0.5, "0.bias": 12.5 ** 0.5, "1.weight": 5.0, "1.bias": 1.0})


@pytest.mark.parametrize("scale", ["rms", "none"])
def test_relative_learning_rate_trains_alike_at_any_weight_scale(scale):
    """lr_scale rms: a model whose weights (and outputs) are c times smaller follows the same training,
    c times smaller, so one learning rate suits models of any weight scale; an absolute rate does not."""
    from torch import nn

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 16, 8, generator=g) for _ in range(4)]
    dense = torch.randn(6, 8, generator=g)
    runs = []
    for c in (1.0, 0.05):
        block = nn.Sequential(nn.Linear(8, 6))
        mask = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) < 0.5
        with torch.no_grad():
            block[0].weight.copy_((c * dense * 0.7).masked_fill(mask, 0))
            block[0].bias.fill_(0.1 * c)
        targets = [c * x @ dense.T for x in xs]
        r = reconstruct_block(block, {"0": mask}, xs, [{}] * 4, targets, epochs=3, lr=0.05, holdout=1,
                              grad_clip=None, lr_scale=scale)
        assert bool((block[0].weight[mask] == 0).all())
        runs.append((r, block[0].weight.detach() / c))
    (r1, w1), (r2, w2) = runs
    assert r1.heldout_after < 0.9 * r1.heldout_before
    if scale == "rms":
        torch.testing.assert_close(w2, w1, rtol=1e-3, atol=1e-4)
        assert r2.heldout_after / r2.heldout_before == pytest.approx(r1.heldout_after / r1.heldout_before, rel=1e-3)
    else:
        assert not torch.allclose(w2, w1, rtol=1e-2, atol=1e-2)


def test_unknown_lr_scale_is_refused(windows):
    block, masks, acts, targets = _block_problem(windows)
    with pytest.raises(ValueError, match="lr_scale"):
        reconstruct_block(block, masks, acts.hidden, acts.kwargs, targets, lr_scale="weight")
