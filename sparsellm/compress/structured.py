"""Structured pruning: remove whole FFN intermediate channels and whole attention KV groups, so that
the weight matrices get smaller and the model faster on any hardware.

A channel j of a gated FFN is row j of gate_proj and up_proj plus column j of down_proj (OPT: row j of
fc1 and its bias, column j of fc2; the adapter names these Linears); a KV group
g is key/value head g, the query heads that share it (rows of q_proj, columns of o_proj) and its rows
of k_proj/v_proj. Removing a group keeps num_key_value_groups (query heads per KV head) unchanged,
which transformers' attention reads from the module, not from the weights. Every method scores the
columns of the "out" matrix (down_proj, o_proj) together with the matching rows of the "in" matrices
(gate/up, q) and the activation norm entering the out matrix; a group's score sums its columns.

The stage runs layer by layer on calibration activations propagated through the already-pruned
layers (calibrate.engine). CFSP first allocates per-block budgets from a dense pass (cfsp.py)."""
from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..calibrate.engine import collect_stats
from ..calibrate.walk import capture, check_finite, walk_layers
from .. import measure
from ..errors import CompressionError
from ..loading.adapters import Adapter, _get
from ..specs import Strict
from ..stage import Stage, implementation, register, stage_kind

log = logging.getLogger(__name__)


class StructureSpec(Strict):
    """What every structured-pruning spec has: how much of the FFN and of the heads to remove, and how."""

    ffn: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of FFN intermediate channels (= FFN parameters) to remove")
    heads: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of attention heads to remove, in whole KV groups "
                         "(GQA: a key/value head with all the query heads that share it)")
    round_to: int = Field(8, gt=0, description="kept FFN widths are multiples of this (e.g. 8, 64, 128 for fast kernels)")
    uniform: bool = Field(False, description="one width for every layer: a stock architecture that transformers loads "
                          "without custom code (otherwise per-layer widths need the modeling file in the output folder)")

    @model_validator(mode="after")
    def _something(self):
        if self.ffn == 0 and self.heads == 0:
            raise ValueError("nothing to remove: set ffn and/or heads to a fraction in (0, 1)")
        return self


class WandaSPStructure(StructureSpec):
    """Structured Wanda (as in the FLAP paper): channel score Σ_k |W_kj|·‖x_j‖ over the channel's output weights."""
    method: Literal["wanda-sp"]


class MagnitudeStructure(StructureSpec):
    """Channel score from weight norms only (no calibration data)."""
    method: Literal["magnitude"]


# ---- the interface -----------------------------------------------------------------------------

class StructuredMethod(ABC):
    """Scores the prunable units of a layer; optionally sets per-block keep ratios first."""

    needs_activations: bool = True

    def __init__(self, spec):
        self.spec = spec

    @abstractmethod
    def column_scores(self, out_w: torch.Tensor, in_ws: list[torch.Tensor], sq_norm: torch.Tensor | None) -> torch.Tensor:
        """One score per input column j of out_w (= output row j of every in_w); higher = keep.
        Must be additive over the columns of a unit (a group's score is the sum)."""

    def block_keep(self, model, adapter, windows, device, batch_size, target: float,
                   io=None) -> tuple[list[float], dict] | None:
        """Per-block keep ratios for `target` (mean 1 - target), with details for the report; None: uniform.
        `io`: the read-only io of the layer walk (a streamed or offloaded model)."""
        return None


class MagnitudeSP(StructuredMethod):
    needs_activations = False

    def column_scores(self, out_w, in_ws, sq_norm):
        """Squared L2 norm of everything the column carries: out_w[:, j] and each in_w[j, :]."""
        score = out_w.float().pow(2).sum(0)
        for w in in_ws:
            score = score + w.float().pow(2).sum(1)
        return score


class WandaSP(StructuredMethod):
    def column_scores(self, out_w, in_ws, sq_norm):
        """Σ_k |W_kj|·‖x_j‖: Wanda's score summed over the column (FLAP's Wanda-sp)."""
        return (out_w.abs().float() * sq_norm.float().sqrt().to(out_w.device)[None, :]).sum(0)


# ---- widths ------------------------------------------------------------------------------------

def uniform_width(full: int, remove: float, multiple: int = 1) -> int:
    """Nearest multiple of `multiple` to (1 - remove)·full, at least `multiple`, at most full."""
    if multiple > full:
        raise ValueError(f"round_to {multiple} exceeds the width {full}")
    n = round(round((1.0 - remove) * full, 9) / multiple) * multiple
    return min(max(n, multiple), full)


def round_widths(ideal: list[float], full: int, multiple: int = 1) -> list[int]:
    """Integer widths near `ideal`, each a multiple of `multiple` (or full) in [multiple, full], whose
    sum is as close as possible to sum(ideal): floor each, then hand out the remaining units to the
    largest remainders (ties: earlier blocks first)."""
    if multiple > full:
        raise ValueError(f"round_to {multiple} exceeds the width {full}")
    widths = [min(max(int(x // multiple) * multiple, multiple), full) for x in ideal]
    left = round((sum(ideal) - sum(widths)) / multiple)
    step = 1 if left > 0 else -1
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - widths[i]) * step, i))
    while left:
        moved = False
        for i in order:
            if left == 0:
                break
            new = min(widths[i] + step * multiple, full)
            if new != widths[i] and new >= multiple:
                widths[i], left, moved = new, left - step, True
        if not moved:
            break
    return widths


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` best units, in their original order (stable on ties)."""
    best = torch.argsort(scores.double().cpu(), descending=True, stable=True)[:keep]
    return torch.sort(best).values


def unit_scores(columns: torch.Tensor, unit: int) -> torch.Tensor:
    return columns.reshape(-1, unit).sum(1)


# ---- surgery -----------------------------------------------------------------------------------

def _keep(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.detach().index_select(dim, idx).contiguous(), requires_grad=False)
    if dim == 0 and lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[idx].contiguous(), requires_grad=False)
    lin.out_features, lin.in_features = lin.weight.shape


def fused_rows(idx: torch.Tensor, parts: int, width: int) -> torch.Tensor:
    """Rows of a Linear stacking `parts` projections of `width` rows each (Phi-3's gate_up_proj: gate | up)
    that hold units `idx` of every part."""
    return torch.cat([idx + p * width for p in range(parts)])


def in_parts(layer: nn.Module, names: dict, name: str) -> list[torch.Tensor]:
    """The weights of the projections a Linear stands for: its own, or the row blocks of a fused one."""
    w = _get(layer, name).weight
    parts = names.get("fused", {}).get(name, 1)
    return list(w.chunk(parts, 0)) if parts > 1 else [w]


def keep_channels(layer: nn.Module, names: dict, idx: torch.Tensor) -> None:
    """Keep FFN channels `idx`: rows of gate/up (or fc1, bias included; both halves of a fused gate_up_proj),
    columns of down (or fc2)."""
    fused = names.get("fused", {})
    for n in names["ffn_in"]:
        lin = _get(layer, n)
        parts = fused.get(n, 1)
        _keep(lin, fused_rows(idx, parts, lin.out_features // parts) if parts > 1 else idx, 0)
    _keep(_get(layer, names["down"]), idx, 1)
    parent = names["down"].rpartition(".")[0]
    mlp = _get(layer, parent) if parent else layer
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(idx)


def group_rows(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Row (or column) indices of units `groups`, each `width` consecutive rows."""
    return (groups[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def keep_groups(layer: nn.Module, names: dict, groups: torch.Tensor) -> None:
    """Keep KV groups `groups`: their k/v heads, the query heads that share them (q rows, o columns)."""
    hd, rep = names["head_dim"], names["heads"] // names["kv_heads"]
    q_idx, kv_idx = group_rows(groups, rep * hd), group_rows(groups, hd)
    _keep(_get(layer, names["q"]), q_idx, 0)
    _keep(_get(layer, names["k"]), kv_idx, 0)
    _keep(_get(layer, names["v"]), kv_idx, 0)
    _keep(_get(layer, names["o"]), q_idx, 1)
    attn = _get(layer, names["attn"])
    for attr in names["head_count_attrs"]:
        setattr(attn, attr, len(groups) * rep)
    # norms over a whole projection's output (OLMo-2 q_norm/k_norm) lose the entries of the removed heads
    for n, which in names.get("projection_norms", {}).items():
        norm = _get(layer, n)
        idx = (q_idx if which == "q" else kv_idx).to(norm.weight.device)
        norm.weight = nn.Parameter(norm.weight.detach()[idx].contiguous(), requires_grad=False)


# ---- the stage ---------------------------------------------------------------------------------

def _stock_config(config, inter: int, kv: int, names: dict):
    """The config of the same architecture with these widths, or None when the stock class cannot
    express them (e.g. LlamaConfig wants hidden_size % num_attention_heads == 0; OPT has no head_dim)."""
    probe = copy.deepcopy(config)
    setattr(probe, names["width_key"], inter)
    if names["config_head_dim"]:
        probe.head_dim = names["head_dim"]
        probe.num_attention_heads = kv * (names["heads"] // names["kv_heads"])
        probe.num_key_value_heads = kv
    elif kv != names["kv_heads"]:
        return None
    try:
        if hasattr(probe, "validate_architecture"):
            probe.validate_architecture()
    except Exception:  # transformers' strict-dataclass errors have no common base
        return None
    return probe


STOCK_KEYS = ("head_dim", "num_attention_heads", "num_key_value_heads")


def _uniform_groups(config, names: dict, remove: float) -> int:
    """Kept KV groups for every layer: the nearest count, lowered until a stock config accepts it."""
    kv = uniform_width(names["kv_heads"], remove)
    for g in range(kv, 0, -1):
        if _stock_config(config, names["intermediate"], g, names) is not None:
            if g != kv:
                log.warning("structure uniform: %d KV groups instead of %d so that the stock %s config accepts the "
                            "head count", g, kv, config.model_type)
            return g
    raise CompressionError(f"structure uniform: no head count a stock {config.model_type} config accepts; use "
                           "uniform: false")


def plan_widths(method: StructuredMethod, spec, model, adapter, names, windows, device, batch_size,
                io=None) -> tuple[list[int], list[int], dict]:
    """Kept FFN channels and KV groups per layer, and what the report shows of the allocation."""
    n_layers = len(adapter.layers(model))
    inter, kv = names["intermediate"], names["kv_heads"]
    try:
        if spec.uniform:
            return ([uniform_width(inter, spec.ffn, spec.round_to)] * n_layers,
                    [_uniform_groups(model.config, names, spec.heads) if spec.heads else kv] * n_layers, {})
        ffn_keep = method.block_keep(model, adapter, windows, device, batch_size, spec.ffn, io) if spec.ffn else None
        head_keep = method.block_keep(model, adapter, windows, device, batch_size, spec.heads, io) if spec.heads else None
        details = (ffn_keep or head_keep or (None, {}))[1]
        # without per-block ratios every layer gets the same width (nearest multiple), not a rounding mix
        ffn = (round_widths([r * inter for r in ffn_keep[0]], inter, spec.round_to) if ffn_keep
               else [uniform_width(inter, spec.ffn, spec.round_to)] * n_layers)
        groups = round_widths([r * kv for r in head_keep[0]], kv) if head_keep else [uniform_width(kv, spec.heads)] * n_layers
    except ValueError as e:
        raise CompressionError(f"structure {spec.method}: {e}") from None
    if ffn_keep:
        details["ffn_keep_ratio"] = ffn_keep[0]
    if head_keep:
        details["heads_keep_ratio"] = head_keep[0]
    return ffn, groups, details


def structure(model: nn.Module, adapter: Adapter, windows, spec, method: StructuredMethod, device, batch_size: int,
              io=None) -> dict:
    """Remove FFN channels and KV groups of `model` in place per `spec`; returns the report details. Layer by
    layer: with an `io` (a streamed or offloaded model) each layer is brought in, pruned and written out."""
    adapter.check_structure(model, spec)  # refusals of this family (fused heads, per-layer widths) before any work
    names = adapter.structure_names(model)
    device = torch.device(device)
    layers = adapter.layers(model)
    params_before = measure.parameters(model)
    ffn, groups, details = plan_widths(method, spec, model, adapter, names, windows, device, batch_size,
                                       io.reading() if io is not None else None)
    rep, hd = names["heads"] // names["kv_heads"], names["head_dim"]

    acts = capture(model, adapter, windows, device, batch_size) if method.needs_activations else None
    if acts is not None:
        check_finite(acts.hidden, "entering decoder layer 0", layers[0])
    for i, layer in walk_layers(model, adapter, device, io, f"structure {spec.method}"):
        want = {}
        if ffn[i] < names["intermediate"]:
            want[names["down"]] = _get(layer, names["down"])
        if groups[i] < names["kv_heads"]:
            want[names["o"]] = _get(layer, names["o"])
        needs = {n: frozenset({"sq_norm"}) if acts is not None else frozenset() for n in want}
        stats = collect_stats(layer, want, needs, acts) if acts is not None else {}
        sq = {n: s.sq_norm for n, s in stats.items()}
        if names["down"] in want:
            cols = method.column_scores(_get(layer, names["down"]).weight,
                                        [w for n in names["ffn_in"] for w in in_parts(layer, names, n)],
                                        sq.get(names["down"]))
            keep_channels(layer, names, top_units(cols, ffn[i]))
        if names["o"] in want:
            cols = method.column_scores(_get(layer, names["o"]).weight, [_get(layer, names["q"]).weight], sq.get(names["o"]))
            keep_groups(layer, names, top_units(unit_scores(cols, rep * hd), groups[i]))
        if acts is not None and i + 1 < len(layers):
            acts.advance(layer)
    del acts
    stock = _finish_config(model, adapter, names, ffn, groups)
    params_after = measure.parameters(model)
    log.info("structure %s: FFN %d -> %d..%d channels, KV groups %d -> %d..%d, parameters %d -> %d%s", spec.method,
             names["intermediate"], min(ffn), max(ffn), names["kv_heads"], min(groups), max(groups), params_before,
             params_after, " (stock architecture)" if stock else " (per-layer widths: needs the modeling file)")
    return {"intermediate_size": ffn, "kv_groups": groups, "heads": [g * rep for g in groups],
            "parameters": [params_before, params_after], "stock_architecture": stock, **details}


def _finish_config(model, adapter: Adapter, names: dict, ffn: list[int], groups: list[int]) -> bool:
    """Equal widths that the stock config accepts become the config itself (a plain architecture);
    otherwise config.sparsellm_structure describes each layer for the runtime (modeling_sliced.py)."""
    if len(set(ffn)) == 1 and len(set(groups)) == 1 and getattr(model.config, "sparsellm_slicing", None) is None:
        stock = _stock_config(model.config, ffn[0], groups[0], names)
        if stock is not None:
            for key in (names["width_key"], *(STOCK_KEYS if names["config_head_dim"] else ())):
                setattr(model.config, key, getattr(stock, key))
            return True
    model.config.sparsellm_structure = {
        "base_model_type": model.config.model_type,
        "names": {k: names[k] for k in ("q", "k", "v", "o", "ffn_in", "down", "attn", "head_count_attrs")}
                 | {k: names[k] for k in ("fused", "projection_norms") if names.get(k)},
        "layers_path": adapter.layers_path, "head_dim": names["head_dim"], "kv_group_size": names["heads"] // names["kv_heads"],
        "layers": [{"intermediate_size": f, "kv_groups": g} for f, g in zip(ffn, groups)]}
    return False


def linear_flops(model: nn.Module) -> int:
    """Multiply-accumulate FLOPs per token of every Linear (2 per weight): what structured pruning cuts."""
    return sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@stage_kind
class StructureStage(Stage):
    family_refusal = "structure_refusal"
    kind = "structure"

    def whole_model_reason(self, flag: str) -> str | None:
        return None  # layer by layer: the widths come from a read-only pass, then each layer is pruned in turn

    def check(self, ctx) -> None:
        ctx.adapter.check_structure(ctx.model, self.spec)  # unsupported architectures fail before calibration

    def run(self, ctx) -> list[dict]:
        method = implementation("structure", self.spec.method)(self.spec)
        reports = self.timed(ctx, lambda: structure(ctx.model, ctx.adapter, ctx.windows, self.spec, method, ctx.device,
                                                    ctx.batch_size, ctx.handle.io()))
        # the recovery budget of a recover stage after it follows this stage's coarse importance
        ctx.results["block_weight"] = reports[0]["details"].get("block_weight") or ctx.results.get("block_weight")
        return reports


register("structure", WandaSPStructure, WandaSP)
register("structure", MagnitudeStructure, MagnitudeSP)
