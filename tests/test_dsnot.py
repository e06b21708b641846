"""DSnoT: hand-computed swaps and the invariants it promises on any starting mask."""
import pytest
import torch

from sparsellm.compress.dsnot import dsnot_refine, row_error
from sparsellm.compress.magnitude import magnitude_mask
from sparsellm.compress.sparsegpt import sparsegpt_prune
from sparsellm.compress.wanda import wanda_mask

ONES = torch.ones(6)


def _hand_case(**kw):
    D = torch.tensor([[4.0, -1.0, 2.0, 3.0, 1.0, -2.0]])
    W = torch.tensor([[0.0, 0.0, 2.0, 3.0, 0.0, -2.0]])  # pruned: 4, -1, 1 -> e = 4
    return D, W, dsnot_refine(D, W, ONES, ONES, ONES, **kw)


def test_hand_case_swaps():
    # e=4: grow 4 (largest positive), prune -2 (only negative kept) -> e=-2;
    # e=-2: grow -1, prune 2 (lowest score of the positive kept 2, 3) -> e=1;
    # e=1: the only positive candidate left (1) has no negative partner -> stop
    D, W, r = _hand_case(threshold=0.1)
    assert r.weight.tolist() == [[4.0, -1.0, 0.0, 3.0, 0.0, 0.0]]
    assert r.error_before.tolist() == [4.0] and r.error_after.tolist() == [1.0]
    assert r.swaps == 2


def test_hand_case_threshold_and_same_sign():
    _, _, r = _hand_case(threshold=2.5)  # stops once |e| = 2 <= 2.5
    assert r.weight.tolist() == [[4.0, 0.0, 2.0, 3.0, 0.0, 0.0]] and r.swaps == 1
    # same sign: growing 4 would flip e to -2, so 1 is grown instead: e = 4 - 1 - 2 = 1
    _, _, r = _hand_case(threshold=0.1, same_sign=True)
    assert r.weight.tolist() == [[0.0, 0.0, 2.0, 3.0, 1.0, 0.0]] and r.error_after.tolist() == [1.0]
    _, _, r = _hand_case(threshold=10.0)  # nothing to do
    assert r.swaps == 0 and r.cycles == 0


def test_hand_case_max_cycles():
    D, W, r = _hand_case(threshold=0.1, max_cycles=1)
    assert r.cycles == 1 and r.weight.tolist() == [[4.0, 0.0, 2.0, 3.0, 0.0, 0.0]]


def _stats(cols, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1) + torch.randn(cols, generator=g)
    return X.mean(0), X.var(0, unbiased=False), (X * X).mean(0), X


def _start(kind, D, sq, X, sparsity, nm):
    if kind == "wanda":
        return D.masked_fill(wanda_mask(D, sq, sparsity, nm), 0)
    if kind == "magnitude":
        return D.masked_fill(magnitude_mask(D, sparsity, nm, "row"), 0)
    W, _ = sparsegpt_prune(D, X.T @ X / X.shape[0], sparsity, nm, blocksize=32, scope="row")
    return W


@pytest.mark.parametrize("kind", ["wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("nm,sparsity", [(None, 0.6), (None, 0.7), ((2, 4), 0.5), ((4, 8), 0.5)])
@pytest.mark.parametrize("same_sign,criterion", [(False, "mean"), (True, "mean"), (False, "mse")])
def test_invariants(kind, nm, sparsity, same_sign, criterion):
    torch.manual_seed(1)
    rows, cols = 40, 64
    D = torch.randn(rows, cols)
    mean, var, sq, X = _stats(cols, 2)
    W = _start(kind, D, sq, X, sparsity, nm)
    r = dsnot_refine(D, W, mean * 64, var, sq, nm[1] if nm else None, max_cycles=20, threshold=0.05, same_sign=same_sign,
                     criterion=criterion, window=64)
    out = r.weight
    # sparsity is unchanged per row, and per N:M group
    assert torch.equal((out == 0).sum(1), (W == 0).sum(1))
    if nm:
        assert torch.equal((out == 0).view(rows, -1, nm[1]).sum(2), (W == 0).view(rows, -1, nm[1]).sum(2))
    # values are never changed: each entry is 0, its starting value, or (when grown) its dense value
    assert bool(((out == 0) | (out == W) | ((W == 0) & (out == D))).all())
    # the error it minimizes never grows, and it is the error of the returned weights
    assert bool((r.error_after.abs() <= r.error_before.abs() + 1e-9).all())
    assert torch.allclose(row_error(D, out, mean * 64), r.error_after, rtol=1e-6, atol=1e-6)
    assert r.swaps > 0 and r.cycles <= 20
    if same_sign:
        assert bool((torch.sign(r.error_after) * torch.sign(r.error_before) >= 0).all())
    if criterion == "mse":
        # nor does the row's expected squared error under H = diag(Var x) + E[x]E[x]^T
        def mse(Wx):
            return (row_error(D, Wx, mean) ** 2 + ((D - Wx).double() ** 2 * var.double()).sum(1))
        assert bool((mse(out) <= mse(W) + 1e-9).all())
    # every weight moves at most once: at most `cycles` swaps, i.e. 2 changed entries per cycle, per row
    assert int((out != W).sum(1).max()) <= 2 * r.cycles


def test_stops_at_max_cycles_and_is_deterministic():
    torch.manual_seed(3)
    D = torch.randn(16, 128)
    mean, var, sq, X = _stats(128, 4)
    W = _start("wanda", D, sq, X, 0.7, None)
    for cycles in (1, 3, 7):
        r = dsnot_refine(D, W, mean * 512, var, sq, max_cycles=cycles, threshold=0.0)
        assert r.cycles == cycles
        assert int((r.weight != W).sum(1).max()) <= 2 * cycles
    a = dsnot_refine(D, W, mean * 512, var, sq, max_cycles=50, threshold=0.1)
    b = dsnot_refine(D, W, mean * 512, var, sq, max_cycles=50, threshold=0.1)
    assert torch.equal(a.weight, b.weight)


def test_reduces_expected_error_of_the_layer_output():
    """The quantity DSnoT minimizes is the mean output error over the calibration inputs."""
    torch.manual_seed(5)
    D = torch.randn(32, 96)
    mean, var, sq, X = _stats(96, 6)
    W = _start("wanda", D, sq, X, 0.6, None)
    r = dsnot_refine(D, W, mean, var, sq, max_cycles=50, threshold=1e-4)
    bias_before = (X @ (D - W).T).mean(0).abs()
    bias_after = (X @ (D - r.weight).T).mean(0).abs()
    assert torch.allclose(bias_before.double(), r.error_before.abs(), rtol=1e-3, atol=1e-3)
    assert bias_after.sum() < 0.5 * bias_before.sum()


def test_rejects_bad_group():
    with pytest.raises(ValueError, match="does not divide"):
        dsnot_refine(torch.ones(2, 6), torch.ones(2, 6), ONES, ONES, ONES, group=4)


def test_wanda_then_dsnot_in_one_pass_keeps_row_sparsity_and_dense_values(windows):
    from conftest import tiny_model
    from sparsellm.calibrate import make_selector, run_layerwise
    from sparsellm.compress import build_method
    from sparsellm.loading import get_adapter
    from sparsellm.recipe import recipe_from_dict

    r = recipe_from_dict({"stages": [{"prune": {"method": "wanda", "sparsity": 0.6}},
                                     {"refine": {"method": "dsnot", "ignore": ["*.mlp.*"]}}]})
    dense = tiny_model("llama")
    wanda_only, refined = tiny_model("llama"), tiny_model("llama")
    adapter = get_adapter(dense)
    run_layerwise(wanda_only, adapter, windows, [build_method(r.stages[0].spec)], make_selector([], []), batch_size=4)
    everything = make_selector([], [])
    methods = [build_method(s.spec) for s in r.stages]
    secs = run_layerwise(refined, adapter, windows, methods, [everything, make_selector([], ["*.mlp.*"])], batch_size=4)
    assert len(secs) == 2 and all(s > 0 for s in secs)
    changed = 0
    for (name, d), (_, w), (_, f) in zip(dense.named_parameters(), wanda_only.named_parameters(), refined.named_parameters()):
        if not name.endswith("proj.weight"):
            continue
        assert torch.equal((f == 0).sum(1), (w == 0).sum(1)), name
        assert bool(((f == 0) | (f == d)).all()), name
        if name.startswith("model.layers.0.mlp."):
            # ignored by the refine stage (layer 1 differs: its inputs come from a refined layer 0)
            assert torch.equal(f, w), name
        else:
            changed += int((f != w).any())
    # layer 0 sees the same inputs either way, so its attention projections must have been refined
    assert changed > 0


def test_mse_criterion_refuses_swaps_that_cost_more_variance_than_they_save():
    # the mean criterion grows 4 (channel variance 0) and prunes -2; with Var[x_5] = 10 that prune
    # costs 40 in variance while the mean error only drops from 16 to 4: refused under "mse"
    D = torch.tensor([[4.0, -1.0, 2.0, 3.0, 1.0, -2.0]])
    W = torch.tensor([[0.0, 0.0, 2.0, 3.0, 0.0, -2.0]])
    var = torch.tensor([1e-9, 1.0, 1.0, 1.0, 1.0, 10.0])
    r = dsnot_refine(D, W, ONES, var, ONES, threshold=0.1, criterion="mse")
    assert r.weight[0, 5] == -2.0
    r = dsnot_refine(D, W, ONES, var, ONES, threshold=0.1, criterion="mean")
    assert r.weight[0, 5] == 0.0


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_refine_modules_resolved_by_the_adapter(arch):
    from conftest import tiny_model
    from sparsellm.calibrate import make_selector
    from sparsellm.calibrate.engine import target_linears
    from sparsellm.loading import get_adapter
    from sparsellm.compress.prune import refine_selector
    from sparsellm.recipe import recipe_from_dict

    model = tiny_model(arch)
    adapter = get_adapter(model)
    names = list(target_linears(adapter.layers(model)[0], adapter.layer_prefix(0), make_selector([], [])))
    full = [f"{adapter.layer_prefix(0)}.{n}" for n in names]
    prune_sel = make_selector([], ["*k_proj"])

    def chosen(refine):
        spec = recipe_from_dict({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"refine": refine}]}).stages[1].spec
        sel = refine_selector(adapter, spec, prune_sel)
        return {n.split(".")[-1] for n in full if sel(n)}

    attn = {"q_proj", "v_proj", "o_proj"} if arch == "llama" else {"q_proj", "v_proj", "out_proj"}
    mlp = {"gate_proj", "up_proj", "down_proj"} if arch == "llama" else {"fc1", "fc2"}
    assert chosen({"method": "dsnot", "modules": "attention"}) == attn  # k_proj was not pruned, so it is not refined either
    assert chosen({"method": "dsnot"}) == mlp  # the default: the MLP Linears only
    assert chosen({"method": "dsnot", "modules": "mlp"}) == mlp
    assert chosen({"method": "dsnot", "modules": "all"}) == attn | mlp
    assert chosen({"method": "dsnot", "modules": "all", "ignore": ["*.v_proj"]}) == (attn | mlp) - {"v_proj"}


def test_verify_keeps_only_rows_whose_output_error_drops():
    from sparsellm.compress.dsnot import keep_better_rows, row_output_error

    torch.manual_seed(7)
    D = torch.randn(24, 48)
    mean, var, sq, X = _stats(48, 8)
    W = _start("wanda", D, sq, X, 0.7, None)
    xtx = X.T @ X / X.shape[0]
    r = dsnot_refine(D, W, mean * 64, var, sq, max_cycles=50, threshold=0.0, criterion="mean", window=64)
    out, kept = keep_better_rows(D, W, r.weight, xtx)
    e_start, e_ref, e_out = (row_output_error(D, w, xtx) for w in (W, r.weight, out))
    # the exact output error never grows, and it is the lower of the two per row
    assert bool((e_out <= e_start).all()) and torch.allclose(e_out, torch.minimum(e_start, e_ref))
    assert kept == int((e_ref >= e_start).sum())
    # direct check against the inputs themselves
    direct = ((X @ (D - out).T) ** 2).mean(0)
    assert torch.allclose(direct, e_out, rtol=1e-3)
    assert torch.equal((out == 0).sum(1), (W == 0).sum(1))


# --- exact swap scores (criterion "exact") --------------------------------------------------------

from sparsellm.compress.dsnot import dsnot_exact, exact_row_error  # noqa: E402


def test_exact_identity_hessian_converges_to_magnitude():
    # H = I: Δe(i, j) = w0_i² − w0_j², so the greedy ends on the largest magnitudes.
    # kept -1.5, 1, -2.5, e = 16 + 4 + 9 = 29; cycle 1: prune 1, grow 4 (Δ = 1 − 16) -> e = 14;
    # cycle 2: prune -1.5, grow 3 (Δ = 2.25 − 9) -> e = 7.25; cycle 3: best is prune -2.5 / grow 2, Δ = +2.25: stop
    D = torch.tensor([[4.0, -1.5, 2.0, 3.0, 1.0, -2.5]])
    W = torch.tensor([[0.0, -1.5, 0.0, 0.0, 1.0, -2.5]])
    r = dsnot_exact(D, W, torch.eye(6), candidates=6)
    assert r.weight.tolist() == [[4.0, 0.0, 0.0, 3.0, 0.0, -2.5]]
    assert r.error_before.tolist() == [29.0] and r.error_after.tolist() == [7.25]
    assert r.swaps == 2 and r.cycles == 3


def test_exact_uses_the_correlations():
    # inputs 0 and 1 are correlated (0.9): keeping input 2 alone leaves d = (1, -1, 0), whose error
    # 1 + 1 − 2·0.9 = 0.2 is far below the 1.64 of keeping input 0 (the larger weight: magnitude's choice).
    # From keep-0: d = (0, -1, .8), r = Hd = (-.9, -1, .8); prune 0 (a = 1): P = 2·(-.9) + 1 = -0.8;
    # grow 2 (b = -.8): G = 2·(-.8)(.8) + .64 = -0.64; H_02 = 0 -> Δ = -1.44; grow 1 instead: Δ = 0 (not taken)
    H = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    D = torch.tensor([[1.0, -1.0, 0.8]])
    r = dsnot_exact(D, torch.tensor([[1.0, 0.0, 0.0]]), H, candidates=3)
    assert torch.equal(r.weight, torch.tensor([[0.0, 0.0, 0.8]])) and r.swaps == 1
    assert torch.allclose(r.error_before, torch.tensor([1.64], dtype=torch.float64))
    assert torch.allclose(r.error_after, torch.tensor([0.2], dtype=torch.float64))


def _hessian(cols, seed, n=256):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.5 + torch.randn(cols, generator=g)
    return X.T @ X / n


def _brute_greedy(D, W, H, group, cycles):
    """Reference: per row, try every (kept, pruned) swap (inside the group for N:M), recompute the
    error from scratch, take the best while it improves."""
    out = W.clone().double()
    D, H = D.double(), H.double()
    for row in range(D.shape[0]):
        w = out[row]
        pruned = w == 0
        for _ in range(cycles):
            e0 = float((D[row] - w) @ H @ (D[row] - w))
            best, pair = e0, None
            for i in range(len(w)):
                for j in range(len(w)):
                    if pruned[i] or not pruned[j] or (group and i // group != j // group):
                        continue
                    v = w.clone()
                    v[i], v[j] = 0, D[row, j]
                    e = float((D[row] - v) @ H @ (D[row] - v))
                    if e < best:
                        best, pair = e, (i, j)
            if pair is None or best >= e0 * (1 - 1e-9):
                break
            i, j = pair
            w[i], w[j] = 0, D[row, j]
            pruned[i], pruned[j] = True, False
    return out


@pytest.mark.parametrize("group,sparsity", [(None, 0.5), (None, 0.75), (4, 0.5), (8, 0.5)])
@pytest.mark.parametrize("cycles", [1, 3, 50])
def test_exact_matches_brute_force_greedy(group, sparsity, cycles):
    torch.manual_seed(11)
    rows, cols = 6, 16
    D = torch.randn(rows, cols)
    H = _hessian(cols, 12)
    nm = (int(group * sparsity), group) if group else None
    W = D.masked_fill(magnitude_mask(D, sparsity, nm, "row"), 0)
    r = dsnot_exact(D, W, H, group, max_cycles=cycles, candidates=cols)
    ref = _brute_greedy(D, W, H, group, cycles)
    assert torch.equal(r.weight.double(), ref)
    assert torch.allclose(r.error_after, exact_row_error(D, ref, H))
    assert r.swaps > 0


@pytest.mark.parametrize("kind", ["wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("nm,sparsity", [(None, 0.6), (None, 0.7), ((2, 4), 0.5), ((4, 8), 0.5)])
@pytest.mark.parametrize("candidates", [4, 64])
def test_exact_invariants(kind, nm, sparsity, candidates):
    torch.manual_seed(1)
    rows, cols = 40, 64
    D = torch.randn(rows, cols)
    mean, var, sq, X = _stats(cols, 2)
    H = X.T @ X / X.shape[0]
    W = _start(kind, D, sq, X, sparsity, nm)
    group = nm[1] if nm else None
    errors, prev = [], None
    for cycles in (1, 2, 5, 30):
        r = dsnot_exact(D, W, H, group, max_cycles=cycles, candidates=candidates)
        out = r.weight
        # sparsity is unchanged per row, and per N:M group
        assert torch.equal((out == 0).sum(1), (W == 0).sum(1))
        if nm:
            assert torch.equal((out == 0).view(rows, -1, nm[1]).sum(2), (W == 0).view(rows, -1, nm[1]).sum(2))
        # each entry is 0, its starting value, or its dense value (grown)
        assert bool(((out == 0) | (out == W) | (out == D)).all())
        # the reported errors are the exact errors of the start and of the result; no row gets worse
        assert torch.allclose(r.error_before, exact_row_error(D, W, H))
        assert torch.allclose(r.error_after, exact_row_error(D, out, H))
        assert bool((r.error_after <= r.error_before).all())
        # more cycles never end higher (the greedy path is the same, only longer)
        if prev is not None:
            assert bool((r.error_after <= prev + 1e-9 * prev.abs()).all())
        prev = r.error_after
        errors.append(float(r.error_after.sum()))
    assert r.swaps > 0 and errors[-1] < errors[0] < float(r.error_before.sum())
    # direct check against the inputs themselves
    direct = ((X.double() @ (D - out).double().T) ** 2).mean(0)
    assert torch.allclose(direct, r.error_after, rtol=1e-4)


def test_exact_is_deterministic_and_rejects_bad_input():
    torch.manual_seed(3)
    D = torch.randn(16, 128)
    H = _hessian(128, 4, n=512)
    W = D.masked_fill(magnitude_mask(D, 0.7, None, "row"), 0)
    a, b = dsnot_exact(D, W, H, max_cycles=20), dsnot_exact(D, W, H, max_cycles=20)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.error_after, b.error_after)
    with pytest.raises(ValueError, match="does not divide"):
        dsnot_exact(torch.ones(2, 6), torch.ones(2, 6), torch.eye(6), group=4)
    with pytest.raises(ValueError, match="candidates"):
        dsnot_exact(D, W, H, candidates=0)


def test_exact_criterion_in_a_layerwise_pass(windows):
    """Wanda then DSnoT(exact) in one pass: needs only XᵀX; sparsity per row kept; values dense or zero;
    layer 0 (same inputs either way) ends with no row's calibration output error above Wanda's."""
    from conftest import tiny_model
    from sparsellm.calibrate import make_selector, run_layerwise
    from sparsellm.calibrate.engine import collect_stats, target_linears
    from sparsellm.calibrate.walk import capture
    from sparsellm.compress import build_method
    from sparsellm.compress.dsnot import DSnoT
    from sparsellm.loading import get_adapter
    from sparsellm.recipe import recipe_from_dict

    r = recipe_from_dict({"stages": [{"prune": {"method": "wanda", "sparsity": 0.6}}, {"refine": {"method": "dsnot"}}]})
    spec = r.stages[1].spec.model_copy(update={"criterion": "exact"})
    dense, wanda_only, refined = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    adapter = get_adapter(dense)
    sel = make_selector([], [])
    run_layerwise(wanda_only, adapter, windows, [build_method(r.stages[0].spec)], sel, batch_size=4)
    dsnot = DSnoT(spec)
    assert dsnot.needs == frozenset({"hessian"})
    run_layerwise(refined, adapter, windows, [build_method(r.stages[0].spec), dsnot], sel, batch_size=4)
    acts = capture(dense, adapter, windows, "cpu", 4)
    layer0 = adapter.layers(dense)[0]
    linears = target_linears(layer0, adapter.layer_prefix(0), sel)
    stats = collect_stats(layer0, linears, {n: frozenset({"hessian"}) for n in linears}, acts)
    changed = 0
    for name, lin in linears.items():
        d = lin.weight
        w = wanda_only.get_submodule(f"{adapter.layer_prefix(0)}.{name}").weight
        f = refined.get_submodule(f"{adapter.layer_prefix(0)}.{name}").weight
        assert torch.equal((f == 0).sum(1), (w == 0).sum(1)), name
        assert bool(((f == 0) | (f == d)).all()), name
        # XᵀX of a Linear in layer 0 is the same for the dense, Wanda and refined runs up to its own group
        H = stats[name].hessian
        assert bool((exact_row_error(d, f, H) <= exact_row_error(d, w, H) * (1 + 1e-6)).all()), name
        changed += int((f != w).any())
    assert changed > 0 and dsnot.rows > 0


def test_exact_groups_with_uneven_counts():
    """A start whose groups do not all have N zeros (e.g. SparseGPT's dead inputs): every group keeps
    its own count, and the result is the brute-force greedy's."""
    torch.manual_seed(13)
    rows, cols = 5, 16
    D = torch.randn(rows, cols)
    H = _hessian(cols, 14)
    W = D.masked_fill(magnitude_mask(D, 0.5, (2, 4), "row"), 0)
    W[0, W[0].nonzero()[0]] = 0  # one group of row 0 with 3 zeros
    W[1, :4] = 0  # a whole group pruned
    W[2, 4:8] = D[2, 4:8]  # a group with nothing pruned
    r = dsnot_exact(D, W, H, 4, max_cycles=50)
    assert torch.equal((r.weight == 0).view(rows, -1, 4).sum(2), (W == 0).view(rows, -1, 4).sum(2))
    assert torch.equal(r.weight.double(), _brute_greedy(D, W, H, 4, 50))
    assert bool((r.error_after <= r.error_before).all()) and r.swaps > 0


def test_shrunk_scales_the_correlations_and_keeps_the_diagonal():
    from sparsellm.compress.dsnot import shrunk

    H = torch.tensor([[2.0, 0.8], [0.8, 1.0]])
    assert shrunk(H, 0.0) is H
    assert torch.equal(shrunk(H, 0.25), torch.tensor([[2.0, 0.6], [0.6, 1.0]]))
    assert torch.equal(shrunk(H, 1.0), torch.diag(torch.diagonal(H)))
    assert torch.equal(H, torch.tensor([[2.0, 0.8], [0.8, 1.0]]))  # the input is left as it was


@pytest.mark.parametrize("nm,sparsity", [(None, 0.6), ((2, 4), 0.5)])
def test_fully_shrunk_exact_swaps_leave_a_wanda_mask_alone(nm, sparsity):
    # with only the diagonal, e = Σ_pruned w0_j² H_jj: Wanda's mask (lowest |w|·‖x_j‖ per row or group) is its
    # minimum, so no swap improves it; with the full XᵀX the same mask does improve
    from sparsellm.compress.dsnot import shrunk

    torch.manual_seed(5)
    D = torch.randn(24, 32)
    _, _, sq, X = _stats(32, 6)
    H = X.T @ X / X.shape[0]
    W = D.masked_fill(wanda_mask(D, torch.diagonal(H) * X.shape[0], sparsity, nm), 0)
    group = nm[1] if nm else None
    assert dsnot_exact(D, W, shrunk(H, 1.0), group, candidates=32).swaps == 0
    half = dsnot_exact(D, W, shrunk(H, 0.5), group, candidates=32)
    full = dsnot_exact(D, W, H, group, candidates=32)
    assert 0 < half.swaps and 0 < full.swaps
    assert bool((half.error_after <= half.error_before).all())


@pytest.mark.parametrize("kind", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("nm,sparsity", [(None, 0.7), ((2, 4), 0.5)])
def test_shrunk_scores_never_end_a_row_worse_on_the_true_xtx(kind, nm, sparsity):
    # swaps scored with a shrunk XᵀX; the final check and the reported errors use the true XᵀX
    from sparsellm.compress.dsnot import shrunk

    torch.manual_seed(8)
    D = torch.randn(40, 64)
    _, _, sq, X = _stats(64, 9)
    H = X.T @ X / X.shape[0]
    W = _start(kind, D, sq, X, sparsity, nm)
    group = nm[1] if nm else None
    r = dsnot_exact(D, W, shrunk(H, 0.5), group, candidates=16, check=H)
    assert torch.allclose(r.error_before, exact_row_error(D, W, H))
    assert torch.allclose(r.error_after, exact_row_error(D, r.weight, H))
    assert bool((r.error_after <= r.error_before).all()) and r.swaps > 0
    assert float(r.error_after.sum()) < float(r.error_before.sum())
    assert torch.equal((r.weight == 0).sum(1), (W == 0).sum(1))
