"""Reconstruction of the kept weights after pruning, with every mask frozen.

Two tools, both pure functions over tensors and modules (no pipeline wiring here):

- `masked_lstsq_refit`: per Linear, the exact minimiser of the calibration output error against the
  dense weights w0 under the mask, row by row. With H = XᵀX / tokens (damped: H + λ·mean(diag H)·I)
  and S the kept columns of a row, (w0 − w)ᵀ H (w0 − w) with w = 0 off S is minimised by
      w_S = H_SS⁻¹ (H w0)_S
  (the "dense-target refit"; SparseGPT's one-pass OBS update approximates it, ADMM pruning and ALPS
  solve it iteratively). Solved exactly, batched Cholesky in float64, rows padded to the largest
  kept count with an identity block.

- `reconstruct_block`: one decoder block (or any nn.Module called as block(hidden, **kwargs)) trained
  with Adam to match given target outputs, ||block(X) − Y||² (mean squared error), on the calibration
  batches in a fixed order; the last `holdout` batches are held back and the parameters of the epoch
  with the lowest held-back error are kept (the starting ones included, so the held-back error never
  ends higher than it started). Pruned entries get zero gradient and are zeroed again after every
  step, so masks, N:M patterns and sparsity stay exact. Deterministic: no sampling, fixed order.
  Optionally each tensor's learning rate is relative to its size (`lr_scale="rms"`, `tensor_scales`).
  This is EBFT's block-wise fine-tuning (Guo et al., 2024) with early stopping; targets are the dense
  block's outputs on the same inputs (the caller computes them)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


# --- exact masked least-squares refit --------------------------------------------------------------

def _damped(hessian: torch.Tensor, damp: float, dev) -> tuple[torch.Tensor, float]:
    """H + λI in float64, and λ = damp · mean diag H."""
    H = hessian.to(dev).double().clone()
    lam = damp * float(torch.diagonal(H).mean().clamp_min(1e-12))
    diag = torch.arange(H.shape[0], device=dev)
    H[diag, diag] += lam
    return H, lam


@torch.no_grad()
def masked_lstsq_refit(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01,
                       solver: str = "cg", iters: int = 50, start: torch.Tensor | None = None,
                       cross: torch.Tensor | None = None, max_elements: int = 1 << 25) -> torch.Tensor:
    """Per row, the kept weights minimising (w0 − w)ᵀ A (w0 − w), A = H + λI (λ = damp · mean diag H),
    with w = 0 where `pruned`: w_S = A_SS⁻¹ (A w0)_S. Returns float32 weights, zero where `pruned`.

    `cross` = X_sᵀ X_d / tokens, with X_s the inputs `hessian` was collected on (the pruned model's)
    and X_d the dense model's inputs to the same Linear on the same windows: then the fit is to the
    dense model's outputs, ||X_s w − X_d w0||² + λ||w − w0||², i.e. w_S = A_SS⁻¹ (C w0 + λ w0)_S,
    so a layer also corrects what the layers before it left wrong (None: C = H, the same inputs).

    solver "cholesky": exact, one float64 Cholesky factorisation per row (rows padded to the largest
    kept count with an identity block; `max_elements` bounds the batch of systems). Cost ~ rows·k³/3.
    solver "cg": `iters` steps of Jacobi-preconditioned conjugate gradients on all rows at once
    (float32 products with A restricted to the kept columns, ~ rows·cols² per step), warm-started
    from `start` (e.g. SparseGPT's weights; default: the dense weights under the mask). Each CG step
    lowers every row's objective in exact arithmetic; a row whose result is not below its start's
    (rounding) keeps its start, so the refit never makes a row worse."""
    if (dense.shape != pruned.shape or hessian.shape != (dense.shape[1], dense.shape[1])
            or (cross is not None and cross.shape != hessian.shape)):
        raise ValueError(f"shapes do not match: weight {tuple(dense.shape)}, mask {tuple(pruned.shape)}, "
                         f"XᵀX {tuple(hessian.shape)}")
    if solver not in ("cg", "cholesky"):
        raise ValueError(f"unknown solver {solver!r}: use cg or cholesky")
    dev = dense.device
    A, lam = _damped(hessian, damp, dev)
    pruned = pruned.to(dev)
    W0 = dense.double()
    if cross is None:
        target = W0 @ A  # (A w0) per row (A symmetric)
    else:
        C = cross.to(dev).double()
        target = W0 @ C.T + lam * W0  # C w0 + λ w0
    if solver == "cholesky":
        return _refit_cholesky(pruned, A, target, max_elements).float()
    return _refit_cg(dense, pruned, A, target, iters, start)


def _objective(W: torch.Tensor, A: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """wᵀ A w − 2 wᵀ b per row (the refit's objective up to a constant), float64."""
    W = W.double()
    return ((W @ A) * W).sum(1) - 2 * (W * target).sum(1)


def _refit_cholesky(pruned: torch.Tensor, A: torch.Tensor, target: torch.Tensor, max_elements: int) -> torch.Tensor:
    rows, cols = pruned.shape
    dev = pruned.device
    kept = ~pruned
    count = kept.sum(1)
    k = int(count.max())
    out = torch.zeros(rows, cols, dtype=torch.float64, device=dev)
    if k == 0:
        return out
    idx = torch.sort(pruned.to(torch.int8), dim=1, stable=True).indices[:, :k]  # kept columns first
    valid = torch.arange(k, device=dev)[None, :] < count[:, None]
    step = max(1, max_elements // (k * k))
    eye = torch.eye(k, dtype=torch.float64, device=dev)
    flat = A.reshape(-1)
    for s in range(0, rows, step):
        ix, v = idx[s:s + step], valid[s:s + step]
        Ab = flat.index_select(0, (ix[:, :, None] * cols + ix[:, None, :]).reshape(-1)).view(ix.shape[0], k, k)
        Ab = torch.where(v[:, :, None] & v[:, None, :], Ab, eye)  # padding: identity rows/columns, zero right-hand side
        b = torch.where(v, target[s:s + step].gather(1, ix), 0.0)
        x = torch.cholesky_solve(b[:, :, None], torch.linalg.cholesky(Ab))[:, :, 0]
        out[s:s + step].scatter_(1, ix, torch.where(v, x, 0.0))
    return out


def _refit_cg(dense: torch.Tensor, pruned: torch.Tensor, A64: torch.Tensor, target: torch.Tensor, iters: int,
              start: torch.Tensor | None) -> torch.Tensor:
    # Jacobi scaling: with s = diag(A)^-1/2, solve for y = x / s with Â = s A s (unit diagonal)
    s = torch.diagonal(A64).rsqrt()
    Ahat = (A64 * s[:, None] * s[None, :]).float()
    keep = (~pruned).float()
    W0 = dense.float()
    B = (target * s).float() * keep  # right-hand side in the scaled variables, kept columns only
    X0 = (W0 if start is None else start.float()).masked_fill(pruned, 0)
    Y = (X0.double() / s).float()
    R = B - (Y @ Ahat) * keep
    P = R.clone()
    rr = (R * R).sum(1)
    for _ in range(iters):
        AP = (P @ Ahat) * keep
        pap = (P * AP).sum(1)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(1e-30), 0.0)
        Y += alpha[:, None] * P
        R -= alpha[:, None] * AP
        rr_new = (R * R).sum(1)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), 0.0)
        P = R + beta[:, None] * P
        rr = rr_new
    X = ((Y.double() * s).float()).masked_fill(pruned, 0)
    worse = _objective(X, A64, target) >= _objective(X0, A64, target)
    return torch.where(worse[:, None], X0, X)


def refit_error(dense: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """(w0 − w)ᵀ H (w0 − w) per row, float64 (the quantity the refit minimises, undamped)."""
    d = dense.double() - weight.double()
    return ((d @ hessian.double()) * d).sum(1)


# --- block reconstruction --------------------------------------------------------------------------

@dataclass
class ReconstructResult:
    heldout_before: float  # mean squared error on the held-back batches, before and after
    heldout_after: float
    train_before: float
    train_after: float
    epochs: int  # epochs run
    best_epoch: int  # 0 = the starting parameters were kept
    steps: int
    seconds: float


def _forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def trainable_parameters(block: nn.Module, masks: dict[str, torch.Tensor], norms: bool = True) -> dict[str, nn.Parameter]:
    """The parameters reconstruction trains: every Linear's weight and bias (pruned entries stay
    frozen through `masks`), and with `norms` the 1-D parameters of the other modules (norm scales
    and shifts). Embedding-like modules inside a block, if any, are left alone."""
    names = {}
    for mname, mod in block.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if isinstance(mod, nn.Linear):
            names.update({f"{mname}.{n}" if mname else n: p for n, p in own})
        elif norms:
            names.update({f"{mname}.{n}" if mname else n: p for n, p in own if p.dim() == 1})
    for m in masks:
        if f"{m}.weight" not in names:
            raise ValueError(f"mask {m!r} names no Linear of the block")
    return names


def tensor_scales(block: nn.Module, params: dict[str, nn.Parameter], pmask: dict[str, torch.Tensor]) -> dict[str, float]:
    """The size of each trained tensor, for a learning rate relative to it: the root mean square of
    its kept entries (a weight's pruned entries do not count). A tensor that is all zero borrows a
    size: a Linear's bias its weight's, any other tensor (a norm scale or shift) 1, the size of a
    neutral norm scale."""
    def rms(name: str) -> float:
        t = params[name].detach().float()
        if name in pmask:
            t = t[~pmask[name]]
        return float(t.pow(2).mean().sqrt()) if t.numel() else 0.0

    scales = {}
    for name in params:
        size = rms(name)
        if size == 0.0:
            mod, _, leaf = name.rpartition(".")
            linear_bias = leaf == "bias" and isinstance(block.get_submodule(mod), nn.Linear)
            size = (rms(f"{mod}.weight" if mod else "weight") if linear_bias else 0.0) or 1.0
        scales[name] = size
    return scales


def _mse(block, hidden, kwargs, targets, index) -> float:
    if not index:
        return float("nan")
    with torch.no_grad():
        tot = sum(float(((_forward(block, hidden[i], kwargs[i]).float() - targets[i].float()) ** 2).mean()) for i in index)
    return tot / len(index)


def reconstruct_block(
    block: nn.Module,
    masks: dict[str, torch.Tensor],
    hidden: list[torch.Tensor],
    kwargs: list[dict],
    targets: list[torch.Tensor],
    epochs: int = 8,
    lr: float = 1e-4,
    holdout: int = 1,
    patience: int = 2,
    norms: bool = True,
    grad_clip: float | None = 1.0,
    lr_scale: str = "none",
) -> ReconstructResult:
    """Train the kept weights of `block` in place to minimise mean((block(X) − Y)²).

    `masks`: Linear name (relative to the block, e.g. "self_attn.q_proj") -> bool tensor, True where
    the weight is pruned; those entries must be zero and stay exactly zero. `hidden`, `kwargs`: the
    calibration batches entering the block with the keyword arguments of each (as the calibration
    engine's Activations hold them); `targets`: the outputs to match, one per batch (e.g. the dense
    block's outputs on the same inputs). The last `holdout` batches are not trained on; after every
    epoch their error decides which parameters are kept (lowest, the start included), and training
    stops after `patience` epochs without a new lowest. Adam (no weight decay), constant learning
    rate, gradient norm clipped to `grad_clip`. `lr_scale` "none": `lr` for every tensor; "rms": each
    tensor's learning rate is `lr` times its size (`tensor_scales`, taken when training starts), so
    that a step changes every tensor by about the same fraction whatever the model's weight scale
    (Adam's step is about the learning rate in absolute terms). Parameters are trained in float32 and
    written back in their own dtype."""
    if not (len(hidden) == len(kwargs) == len(targets)):
        raise ValueError("hidden, kwargs and targets must have one entry per batch")
    if not 0 <= holdout < len(hidden):
        raise ValueError(f"holdout must leave at least one batch to train on: {holdout} of {len(hidden)} batches")
    if epochs < 0 or patience < 1 or lr <= 0:
        raise ValueError("epochs >= 0, patience >= 1 and lr > 0 are required")
    if lr_scale not in ("none", "rms"):
        raise ValueError(f"unknown lr_scale {lr_scale!r}: use none or rms")
    t0 = time.perf_counter()
    params = trainable_parameters(block, masks, norms)
    pmask = {}
    for m, mask in masks.items():
        w = params[f"{m}.weight"]
        if mask.shape != w.shape:
            raise ValueError(f"mask {m!r} has shape {tuple(mask.shape)}, its weight {tuple(w.shape)}")
        mask = mask.to(device=w.device, dtype=torch.bool)
        if bool(w.detach()[mask].ne(0).any()):
            raise ValueError(f"{m}: weights under the mask are not zero (mask and weights disagree)")
        pmask[f"{m}.weight"] = mask
    dtypes = {n: p.dtype for n, p in params.items()}
    grads = {n: p.requires_grad for n, p in block.named_parameters()}
    was_training = block.training
    block.eval()  # no dropout: the same forward as at inference
    block.requires_grad_(False)
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    n_train = len(hidden) - holdout
    train_ix, held_ix = list(range(n_train)), list(range(n_train, len(hidden)))
    xs = [h.float() for h in hidden]
    try:
        train_before = _mse(block, xs, kwargs, targets, train_ix)
        best = held_before = _mse(block, xs, kwargs, targets, held_ix) if holdout else train_before
        best_state = {n: p.detach().clone() for n, p in params.items()}
        best_epoch = bad = steps = run = 0
        if lr_scale == "rms":  # one parameter group per tensor, each with its own rate
            scales = tensor_scales(block, params, pmask)
            opt = torch.optim.Adam([{"params": [p], "lr": lr * scales[n]} for n, p in params.items()], lr=lr)
        else:  # one group: the optimiser of earlier versions, step for step
            opt = torch.optim.Adam(list(params.values()), lr=lr)
        for epoch in range(1, epochs + 1):
            run = epoch
            for i in train_ix:
                loss = ((_forward(block, xs[i], kwargs[i]) - targets[i].float()) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for n, mask in pmask.items():
                    params[n].grad.masked_fill_(mask, 0)
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
                opt.step()
                with torch.no_grad():
                    for n, mask in pmask.items():
                        params[n].masked_fill_(mask, 0)
                steps += 1
            score = _mse(block, xs, kwargs, targets, held_ix) if holdout else _mse(block, xs, kwargs, targets, train_ix)
            log.debug("reconstruct: epoch %d, held-back mse %.6g (best %.6g)", epoch, score, best)
            if score < best:
                best, best_epoch, bad = score, epoch, 0
                best_state = {n: p.detach().clone() for n, p in params.items()}
            else:
                bad += 1
                if bad >= patience:
                    break
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best_state[n])
        train_after = _mse(block, xs, kwargs, targets, train_ix)
    finally:
        for n, p in params.items():
            p.requires_grad_(False)
            p.grad = None
            p.data = p.data.to(dtypes[n])
        for n, p in block.named_parameters():
            p.requires_grad_(grads[n])
        block.train(was_training)
    return ReconstructResult(held_before, best, train_before, train_after, run, best_epoch, steps,
                             time.perf_counter() - t0)


class _Reached(Exception):
    pass


@torch.no_grad()
def part_inputs(block: nn.Module, part: str, hidden: list[torch.Tensor], kwargs: list[dict]) -> tuple[list, list]:
    """The inputs (first positional or `hidden_states` argument, and the other keyword arguments)
    with which `block` calls its submodule `part`, one per batch; the block's forward stops there."""
    sub = block.get_submodule(part)
    xs, kws = [], []

    def grab(module, args, kw):
        kw = dict(kw)
        x = args[0] if args else kw.pop("hidden_states")
        if len(args) > 1:
            raise ValueError(f"{part} is called with {len(args)} positional arguments; only the hidden states are supported")
        xs.append(x.detach())
        kws.append(kw)
        raise _Reached

    handle = sub.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for h, kw in zip(hidden, kwargs):
            try:
                _forward(block, h, kw)
            except _Reached:
                continue
            raise ValueError(f"the block never called {part}")
    finally:
        handle.remove()
    return xs, kws


def reconstruct_parts(
    block: nn.Module,
    dense_block: nn.Module,
    masks: dict[str, torch.Tensor],
    hidden: list[torch.Tensor],
    kwargs: list[dict],
    parts: tuple[str, ...] = ("self_attn", "mlp"),
    **train,
) -> dict[str, ReconstructResult]:
    """Reconstruct the submodules `parts` of `block` one after the other (e.g. attention, then MLP:
    the free-lunch granularity of Wagner et al., 2025), each against the dense block's same submodule
    on the inputs the (already partly reconstructed) sparse block gives it. `train`: the options of
    reconstruct_block (epochs, lr, holdout, patience, grad_clip); norm scales outside the parts are
    left alone. Masks are keyed by Linear names relative to `block`."""
    results = {}
    for part in parts:
        xs, kws = part_inputs(block, part, hidden, kwargs)
        dense = dense_block.get_submodule(part)
        with torch.no_grad():
            targets = [_forward(dense, x, kw) for x, kw in zip(xs, kws)]
        prefix = part + "."
        sub_masks = {n[len(prefix):]: m for n, m in masks.items() if n.startswith(prefix)}
        results[part] = reconstruct_block(block.get_submodule(part), sub_masks, xs, kws, targets, **train)
    return results
