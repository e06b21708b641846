"""SliceGPT (Ashkboos et al., ICLR 2024): rotate the residual stream into its principal directions
and delete the least significant ones, so every weight matrix gets smaller.

1. Norm fusion makes the network invariant to an orthogonal rotation Q of the residual stream:
   norm scales (and LayerNorm biases) move into the Linear layers that read the norm's output;
   LayerNorm models additionally get a zero-mean residual stream (centered embeddings, centered
   outputs of the Linears that write to it) so that LayerNorm becomes a plain RMS norm. RMSNorm
   models are left uncentered (centering is not needed there and would change their function).
2. Rotate-and-slice, layer by layer on calibration data propagated through the already-sliced
   layers: Q from the PCA of each signal (float64), W_in ← W_in·Q[:, :d'], W_out ← Q[:, :d']ᵀ·W_out,
   and shortcut matrices Q_iᵀQ_j on the residual where consecutive bases differ (`per-layer`), or
   one Q for the whole stream (`uniform`), which needs no shortcuts: for RMSNorm architectures the
   result is the stock architecture with a smaller hidden size."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..calibrate.walk import Activations, capture, check_finite, layer_forward, modules_in, walk_layers
from ..errors import CompressionError
from ..loading.adapters import Adapter, _get
from ..loading.modeling_sliced import RMSN, make_sliced_layer
from ..measure import parameters, tied_embeddings
from ..specs import Strict
from ..stage import Stage, order_rule, register, stage_kind

log = logging.getLogger(__name__)


class SliceGPTSlice(Strict):
    """Rotate the residual stream into its principal directions and delete the weakest ones (Ashkboos et al., 2024)."""
    method: Literal["slicegpt"]
    slicing: float = Field(ge=0.0, lt=1.0, description="fraction of the hidden (embedding) dimension to remove")
    rotation: Literal["per-layer", "uniform"] = Field("per-layer", description="a PCA basis per signal with shortcut "
                                                      "matrices on the residual (the paper; output needs "
                                                      "trust_remote_code), or one basis for the whole residual stream "
                                                      "(RMSNorm models: a stock architecture with a smaller hidden size)")
    round_to: int = Field(8, gt=0, description="round the kept width down to a multiple of this (fast kernels)")
    slice_head: bool = Field(False, description="per-layer: also slice the last layer's output and the head's input "
                             "(the reference's default keeps them full); uniform always slices it")
    damp: float = Field(0.01, ge=0.0, description="PCA damping, fraction of the covariance's mean diagonal")
    keep_tied: bool = Field(False, description="uniform, tied embeddings: keep the head tied to the embeddings (smaller) "
                            "with the final norm scale fitted by least squares in the rotated basis; only exact when "
                            "that scale is constant, measured costly on SmolLM2 (see methods.md). Default: a separate head")


# ---- pure math ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _single_thread(device: torch.device):
    """A hidden-size eigh gains nothing from threads on CPU and slows down badly when cores are busy
    (measured 0.3 s on one thread, 0.8-7.7 s on two); one thread also makes the basis independent
    of the thread count."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def sliced_dim(d: int, slicing: float, round_to: int = 1) -> int:
    """Width kept when removing a fraction `slicing` of d, rounded down to a multiple of round_to."""
    n = int(round((1.0 - slicing) * d, 9))  # the round() keeps 0.8 * 10 at 8, not 7
    n -= n % round_to
    if n <= 0:
        raise ValueError(f"slicing {slicing} with round_to {round_to} leaves no dimension of {d}")
    return n


def covariance(batches: list[torch.Tensor]) -> torch.Tensor:
    """Σ xᵀx over every token of every batch, in float64."""
    d = batches[0].shape[-1]
    cov = torch.zeros(d, d, dtype=torch.float64, device=batches[0].device)
    for x in batches:
        x = x.reshape(-1, d).double()
        cov += x.T @ x
    return cov


def pca_basis(cov: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a covariance. The damping adds a
    multiple of the identity: it keeps eigh well conditioned and does not change the vectors."""
    cov = cov + damp * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    with _single_thread(cov.device):
        vals, vecs = torch.linalg.eigh(cov)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def fold_norm(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
              shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W·(s⊙x + t) + b = (W·diag(s))·x + (b + W·t): a norm's affine part moved into the next Linear."""
    w = weight.double()
    new_bias = bias
    if shift is not None:
        new_bias = (0 if bias is None else bias.double()) + w @ shift.double()
    return w * scale.double()[None, :], new_bias


def center_output(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear whose outputs are mean-free over the output features."""
    w = weight.double()
    return w - w.mean(0, keepdim=True), None if bias is None else bias.double() - bias.double().mean()


def fit_tied_scale(gram: torch.Tensor, cov: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Best diagonal w̃ such that E·Q·diag(w̃)·Qᵀ·u ≈ E·diag(w)·u over normalized final states u.

    With tied embeddings the head must stay the rotated embedding E·Q, so the final norm's scale w
    cannot move into the head; it stays on the norm, which now acts in the rotated basis, where w
    is generally not diagonal. Least squares over the logits: with G = EᵀE, C = Σ uuᵀ, A = Q:
    ((AᵀGA) ∘ (AᵀCA))·w̃ = diag(AᵀG·diag(w)·C·A). Exact when w is constant and A square."""
    a = basis.double()
    ga, ca = gram.double() @ a, cov.double() @ a
    lhs = (a.T @ ga) * (a.T @ ca)
    rhs = (ga * (scale.double()[:, None] * ca)).sum(0)
    lhs += 1e-10 * lhs.diagonal().mean() * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    return torch.linalg.solve(lhs, rhs)


# ---- module surgery ----------------------------------------------------------------------------

def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    dtype, dev = lin.weight.dtype, lin.weight.device
    lin.weight = nn.Parameter(weight.to(dev, dtype).contiguous(), requires_grad=False)
    lin.out_features, lin.in_features = lin.weight.shape
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(dev, dtype).contiguous(), requires_grad=False)


def rotate_input(lin: nn.Linear, basis: torch.Tensor) -> None:
    """The Linear now reads x·Q (Q: d×d' orthonormal columns) instead of x."""
    _set_linear(lin, lin.weight.double() @ basis.to(lin.weight.device))


def rotate_output(lin: nn.Linear, basis: torch.Tensor) -> None:
    """The Linear now writes y·Q instead of y."""
    q = basis.to(lin.weight.device)
    _set_linear(lin, q.T @ lin.weight.double(), None if lin.bias is None else q.T @ lin.bias.double())


def rotate_embedding(emb: nn.Embedding, basis: torch.Tensor) -> None:
    w = emb.weight.double() @ basis.to(emb.weight.device)
    emb.weight = nn.Parameter(w.to(emb.weight.dtype).contiguous(), requires_grad=False)
    emb.embedding_dim = w.shape[1]


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, attr, module)


def _norm_params(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None or getattr(norm, "weight", None) is None:
        raise CompressionError(f"SliceGPT: cannot read the scale and epsilon of {type(norm).__name__}")
    return norm.weight.detach(), getattr(norm, "bias", None), float(eps)


tied = tied_embeddings


def _sliced_forward(layer: nn.Module, names: dict) -> None:
    """The sliced forward on a decoder layer; under accelerate's hook (a dispatched model) it becomes
    the forward the hook wraps, so that the hook still places the layer's inputs."""
    wrapper = layer.__dict__.get("forward") if hasattr(layer, "_hf_hook") else None
    make_sliced_layer(layer, names)
    if wrapper is not None:
        layer._old_forward, layer.forward = layer.forward, wrapper


def _stock_forward(layer: nn.Module) -> None:
    """The layer's own class forward again (see _sliced_forward)."""
    if hasattr(layer, "_hf_hook"):
        layer._old_forward = type(layer).forward.__get__(layer)
    else:
        layer.__dict__.pop("forward", None)


@torch.no_grad()
def fuse_head(model: nn.Module, names: dict, keep_final_scale: bool = False) -> dict:
    """The part of norm fusion outside the decoder layers, before the embeddings change: a tied head
    gets its own copy of the embeddings (unless `keep_final_scale`: it stays tied, and the final norm's
    scale stays on the norm), the final norm's affine part moves into the head, and the final norm
    becomes a plain RMS norm. Needs the final norm and the head loaded."""
    head = _get(model, names["lm_head"])
    if tied(model) and not keep_final_scale:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    scale, shift, final_eps = _norm_params(_get(model, names["final_norm"]))
    if keep_final_scale:
        final_scale = scale.detach().clone()
        if shift is not None:
            raise CompressionError("SliceGPT: tied embeddings can only stay tied on RMSNorm models")
    else:
        final_scale = None
        _set_linear(head, *fold_norm(head.weight, head.bias, scale, shift))
    _replace(model, names["final_norm"], RMSN(scale.numel(), final_eps))
    return {"final_eps": final_eps, "final_scale": final_scale, "hidden": scale.numel(), "final_device": scale.device}


@torch.no_grad()
def center_embeddings(model: nn.Module, names: dict) -> None:
    """LayerNorm = RMS norm of the centered input: a mean-free residual stream starts at the embeddings."""
    for path in names["embeddings"]:
        emb = _get(model, path)
        w = emb.weight.double()
        emb.weight = nn.Parameter((w - w.mean(-1, keepdim=True)).to(emb.weight.dtype), requires_grad=False)


@torch.no_grad()
def fuse_layer(layer: nn.Module, names: dict, layernorm: bool, fused: dict) -> None:
    """Norm fusion in one decoder layer: each norm's affine part moves into the Linears that read it
    and the norm becomes a plain RMS norm; LayerNorm models also get mean-free block outputs. Records
    the norms' class (the first seen) and epsilon (the last seen) in `fused`."""
    for norm_name, readers in ((names["norm1"], names["attn_in"]), (names["norm2"], names["mlp_in"])):
        norm = _get(layer, norm_name)
        fused["norm_cls"] = fused.get("norm_cls") or type(norm)
        scale, shift, fused["eps"] = _norm_params(norm)
        for r in readers:
            lin = _get(layer, r)
            _set_linear(lin, *fold_norm(lin.weight, lin.bias, scale, shift))
        _replace(layer, norm_name, RMSN(scale.numel(), fused["eps"]))
    if layernorm:
        for w in (names["attn_out"], names["mlp_out"]):
            lin = _get(layer, w)
            _set_linear(lin, *center_output(lin.weight, lin.bias))
    _sliced_forward(layer, names)


@torch.no_grad()
def fuse_norms(model: nn.Module, adapter: Adapter, keep_final_scale: bool = False) -> dict:
    """Make the model rotation invariant without changing its function (module surgery in place, the
    whole model in memory; the stage does the same one layer at a time). Returns what later steps
    need: the norms' epsilon, the class of the original norm, and the final norm's scale when
    `keep_final_scale` (tied embeddings kept tied: the scale stays on the norm)."""
    names = adapter.slicing_names()
    fused = fuse_head(model, names, keep_final_scale)
    if adapter.norm_kind == "layernorm":
        center_embeddings(model, names)
    for layer in adapter.layers(model):
        fuse_layer(layer, names, adapter.norm_kind == "layernorm", fused)
    return fused


# ---- signals -----------------------------------------------------------------------------------

class _Stop(Exception):
    pass


@torch.no_grad()
def _block_signals(layer: nn.Module, index: int, norm2: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict],
                   full: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs of the layer's second norm and (when `full`) the layer's outputs, per batch."""
    mids, outs = [], []

    def record(module, args):
        mids.append(args[0])
        if not full:
            raise _Stop

    handle = norm2.register_forward_pre_hook(record)
    try:
        for x, kw in zip(inputs, kwargs):
            try:
                outs.append(layer_forward(layer, x, kw))
            except _Stop:
                pass
    finally:
        handle.remove()
    check_finite(mids + outs, f"inside decoder layer {index} while slicing", layer)
    return mids, outs


def _normalized(x: torch.Tensor, mean_dim: int) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / mean_dim)


# ---- the two rotation schemes ------------------------------------------------------------------
# Every pass goes through the layer walk: with an `io` (a model streamed from disk or offloaded by
# accelerate) each layer is brought in, changed and written out in turn, and the modules outside the
# layers (embeddings, final norm, head) are brought in only for the step that changes them.

def _per_layer(model, adapter, acts: Activations, dims: list[dict], damp: float, device, names, fused: dict,
               io=None) -> None:
    """The paper's sequential scheme: every signal gets its own basis, computed on inputs that went
    through the already-sliced layers; shortcuts Q_iᵀQ_j carry the residual between bases."""
    _, q = pca_basis(covariance(acts.hidden), damp)
    with modules_in(model, names["embeddings"], io):
        for path in names["embeddings"]:
            rotate_embedding(_get(model, path), q[:, :dims[0]["in"]])
    layernorm = adapter.norm_kind == "layernorm"
    for i, layer in walk_layers(model, adapter, device, io, desc="slicegpt rotate+slice"):
        fuse_layer(layer, names, layernorm, fused)
        dim = dims[i]
        q = q.to(device)
        q_in = q[:, :dim["in"]]
        for n in names["attn_in"]:
            rotate_input(_get(layer, n), q_in)
        inputs = [(h.double() @ q_in).to(h.dtype) for h in acts.hidden]
        dtype = inputs[0].dtype
        # until its output side is rotated, the attention block writes in the original basis
        layer.attn_shortcut_Q = nn.Parameter(q_in.T.to(dtype).contiguous(), requires_grad=False)
        layer.mlp_shortcut_Q = None
        mids, _ = _block_signals(layer, i, _get(layer, names["norm2"]), inputs, acts.kwargs, full=False)
        _, q_mid = pca_basis(covariance(mids), damp)
        q_mid = q_mid[:, :dim["mid"]]
        del mids
        layer.attn_shortcut_Q = nn.Parameter((q_in.T @ q_mid).to(dtype), requires_grad=False)
        rotate_output(_get(layer, names["attn_out"]), q_mid)
        for n in names["mlp_in"]:
            rotate_input(_get(layer, n), q_mid)
        layer.mlp_shortcut_Q = nn.Parameter(q_mid.T.to(dtype).contiguous(), requires_grad=False)
        _, outs = _block_signals(layer, i, _get(layer, names["norm2"]), inputs, acts.kwargs, full=True)
        del inputs
        _, q = pca_basis(covariance(outs), damp)
        q_out = q[:, :dim["out"]]
        layer.mlp_shortcut_Q = nn.Parameter((q_mid.T @ q_out).to(dtype), requires_grad=False)
        rotate_output(_get(layer, names["mlp_out"]), q_out)
        acts.advance(layer, outs)  # next layer's inputs, still in the original basis
    with modules_in(model, [names["lm_head"]], io):
        rotate_input(_get(model, names["lm_head"]), q[:, :dims[-1]["out"]])


def _uniform_basis(model, adapter, acts: Activations, d: int, width: int, damp: float, device, names, fused: dict,
                   final_cov: bool, io=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One basis for the whole residual stream: the PCA of every signal that enters a norm (each
    layer's input, the attention block's output sum, the final hidden state), each weighted by its
    own energy so that the deep layers' large activations do not drown the early ones. The layers'
    norms are fused on the way. Returns the basis and, when `final_cov`, Σuuᵀ of the normalized final
    states (for fit_tied_scale)."""
    total = torch.zeros(d, d, dtype=torch.float64, device=device)
    cov_u = None

    def add(batches):
        nonlocal total
        c = covariance(batches).to(device)
        total += c / c.diagonal().sum()

    add(acts.hidden)
    layernorm = adapter.norm_kind == "layernorm"
    for i, layer in walk_layers(model, adapter, device, io, desc="slicegpt signals"):
        fuse_layer(layer, names, layernorm, fused)
        mids, outs = _block_signals(layer, i, _get(layer, names["norm2"]), acts.hidden, acts.kwargs, full=True)
        add(mids)
        add(outs)
        acts.advance(layer, outs)
    if final_cov:
        cov_u = covariance([_normalized(h, d) for h in acts.hidden])
    _, q = pca_basis(total, damp)
    return q[:, :width], cov_u


def _uniform_rotate(model, adapter, q: torch.Tensor, device, names, keep_tied: bool, stock: dict | None,
                    io=None) -> None:
    """Rotate every signal into the one basis `q`; with `stock` (see stock_conversion) also turn each layer and
    the final norm back into the stock architecture's. A tied head (`keep_tied`) is tied again to the
    rotated embeddings."""
    with modules_in(model, names["embeddings"] + ([names["lm_head"]] if keep_tied else []), io):
        for path in names["embeddings"]:
            rotate_embedding(_get(model, path), q)
        if keep_tied:
            _get(model, names["lm_head"]).weight = model.get_input_embeddings().weight
    for _, layer in walk_layers(model, adapter, device, io, desc="slicegpt rotate"):
        for n in names["attn_in"] + names["mlp_in"]:
            rotate_input(_get(layer, n), q)
        for n in (names["attn_out"], names["mlp_out"]):
            rotate_output(_get(layer, n), q)
        if stock is not None:
            stock_layer(layer, adapter, names, stock)
    if not keep_tied:
        with modules_in(model, [names["lm_head"]], io):
            rotate_input(_get(model, names["lm_head"]), q)
    if stock is not None:  # on the device the final norm had (where accelerate ran it)
        with modules_in(model, [names["final_norm"]], io):
            final = torch.ones(stock["width"], dtype=torch.float64) if stock["final_scale"] is None else stock["final_scale"].cpu()
            _replace(model, names["final_norm"], stock_norm(stock, final, stock["final_device"]))


# ---- the stage ---------------------------------------------------------------------------------

def slicegpt(model: nn.Module, adapter: Adapter, windows: torch.Tensor, spec, device, batch_size: int, io=None) -> dict:
    """Rotate and slice `model` in place per `spec` (a SliceGPTSlice); returns the report details. Layer by
    layer: with an `io` (a streamed or offloaded model) each layer is brought in, sliced and written out."""
    adapter.check_sliceable(model, spec)
    names = adapter.slicing_names()
    device = torch.device(device)
    params_before = parameters(model)
    uniform = spec.rotation == "uniform"
    stock = uniform and adapter.norm_kind == "rms"
    with modules_in(model, [names["final_norm"], names["lm_head"]], io):
        keep_tied = stock and tied(model) and spec.keep_tied
        fused = fuse_head(model, names, keep_final_scale=keep_tied)
    if adapter.norm_kind == "layernorm":
        with modules_in(model, names["embeddings"], io):
            center_embeddings(model, names)
    d = fused["hidden"]
    try:
        width = sliced_dim(d, spec.slicing, spec.round_to)
    except ValueError as e:
        raise CompressionError(f"SliceGPT: {e}; slice less, or use a smaller round_to") from None
    if stock and not _stock_accepts(model.config, width):
        # e.g. transformers' LlamaConfig insists on hidden_size % num_attention_heads == 0 (head_dim is explicit)
        step = math.lcm(spec.round_to, model.config.num_attention_heads)
        if width < step:
            raise CompressionError(f"SliceGPT uniform: hidden size {width} must be a multiple of {step} for a stock "
                                   f"{model.config.model_type} config; slice less")
        log.warning("slicegpt uniform: hidden size %d -> %d, a multiple of %d (round_to and the %d heads) that a "
                    "stock %s config accepts", width, width - width % step, step, model.config.num_attention_heads,
                    model.config.model_type)
        width -= width % step
    head_width = width if (uniform or spec.slice_head) else d
    dims = [{"in": width, "mid": width, "out": width, "shortcuts": not uniform} for _ in adapter.layers(model)]
    dims[-1]["out"] = head_width

    acts = capture(model, adapter, windows, device, batch_size)
    final_scale = None
    if uniform:
        gram = None
        if keep_tied:
            with modules_in(model, names["embeddings"], io.reading() if io is not None else None):
                embed = model.get_input_embeddings().weight.detach()
                gram = (embed.double().T @ embed.double()).to(device)
        q, cov_u = _uniform_basis(model, adapter, acts, d, width, spec.damp, device, names, fused, keep_tied, io)
        if keep_tied:
            final_scale = fit_tied_scale(gram, cov_u, q, fused["final_scale"].to(device))
        conversion = stock_conversion(fused, width, final_scale, next(model.parameters()).dtype) if stock else None
        del acts
        _uniform_rotate(model, adapter, q, device, names, keep_tied, conversion, io)
    else:
        _per_layer(model, adapter, acts, dims, spec.damp, device, names, fused, io)
        del acts

    if stock:
        stock_config(model.config, conversion)
    else:  # keep_tied implies stock: the runtime form never carries a fitted final-norm scale
        model.config.sparsellm_slicing = {
            "base_model_type": model.config.model_type, "rotation": spec.rotation, "slicing": spec.slicing,
            "names": names, "mean_dim": d, "eps": fused["eps"], "embedding_dim": width, "layers": dims,
            "head_dim": head_width, "head_bias": _get(model, names["lm_head"]).bias is not None,
            "final_norm_weight": False}
    params_after = parameters(model)
    log.info("slicegpt %s %.2f: hidden %d -> %d, parameters %d -> %d%s", spec.rotation, spec.slicing, d, width,
             params_before, params_after, " (stock architecture)" if stock else " (needs modeling_sliced.py)")
    return {"hidden_size": [d, width], "head_dim": head_width, "parameters": [params_before, params_after],
            "stock_architecture": stock, "tied_embeddings": keep_tied,  # a tied head is untied unless kept tied
            "final_norm_fit": None if final_scale is None else "least squares in the rotated basis"}


def _stock_accepts(config, width: int) -> bool:
    probe = copy.deepcopy(config)
    try:
        if getattr(probe, "head_dim", None) is None:
            probe.head_dim = probe.hidden_size // probe.num_attention_heads
        probe.hidden_size = width
        if hasattr(probe, "validate_architecture"):
            probe.validate_architecture()
    except Exception:  # transformers' strict-dataclass errors have no common base
        return False
    return True


def stock_conversion(fused: dict, width: int, final_scale: torch.Tensor | None, dtype: torch.dtype) -> dict:
    """Uniform rotation on an RMSNorm architecture turns the runtime form back into the stock one. The
    stock norm divides by the new width, not the original; the constant sqrt(d/d') goes into the norm
    weights and the epsilon scales by d/d', which is exact. What stock_layer and stock_config need."""
    d = fused["hidden"]
    return {"width": width, "scale": math.sqrt(d / width), "eps": fused["eps"] * d / width,
            "norm_cls": fused["norm_cls"], "final_scale": final_scale, "final_device": fused["final_device"], "dtype": dtype}


def stock_norm(stock: dict, scale: torch.Tensor, device) -> nn.Module:
    norm = stock["norm_cls"](stock["width"], eps=stock["eps"])
    norm.weight = nn.Parameter((scale * stock["scale"]).to(stock["dtype"]), requires_grad=False)
    return norm.to(device)


@torch.no_grad()
def stock_layer(layer: nn.Module, adapter: Adapter, names: dict, stock: dict) -> None:
    """One decoder layer of the runtime form as the stock architecture's (see stock_conversion)."""
    device = next(layer.parameters()).device
    ones = torch.ones(stock["width"], dtype=torch.float64)
    for key in ("norm1", "norm2"):
        _replace(layer, names[key], stock_norm(stock, ones, device))
    _stock_forward(layer)
    for attr in ("sparsellm_names", "attn_shortcut_Q", "mlp_shortcut_Q"):
        layer.__dict__.pop(attr, None)
        layer._parameters.pop(attr, None)
    if hasattr(layer, "hidden_size"):
        layer.hidden_size = stock["width"]
    for n in adapter.config_eps_norms:  # they read the same config epsilon when the export is loaded
        norm = _get(layer, n)
        setattr(norm, "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps", stock["eps"])


def stock_config(cfg, stock: dict) -> None:
    if getattr(cfg, "head_dim", None) is None:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.hidden_size = stock["width"]
    cfg.rms_norm_eps = stock["eps"]


@stage_kind
class SliceStage(Stage):
    family_refusal = "slice_refusal"
    kind = "slice"

    def whole_model_reason(self, flag: str) -> str | None:
        return None  # layer by layer: the embeddings and the head are brought in only for the steps that change them

    def check(self, ctx) -> None:
        ctx.adapter.check_sliceable(ctx.model, self.spec)

    def run(self, ctx) -> list[dict]:
        return self.timed(ctx, lambda: slicegpt(ctx.model, ctx.adapter, ctx.windows, self.spec, ctx.device, ctx.batch_size,
                                                ctx.handle.io()))


register("slice", SliceGPTSlice, slicegpt)


def _round_to_problem(i, stages):
    """An N:M stage after slicing needs widths that stay multiples of M."""
    if not getattr(stages[i].spec, "nm", None):
        return None
    m = stages[i].spec.nm[1]
    for j, prev in enumerate(stages[:i]):
        if prev.kind == "slice" and prev.spec.round_to % m:
            return (f"stages.{j}: round_to {prev.spec.round_to} must be a multiple of M={m} "
                    f"for the {stages[i].spec.pattern} stage after it")
    return None


order_rule("prune")(_round_to_problem)
order_rule("learn")(_round_to_problem)
