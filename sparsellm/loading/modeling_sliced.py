"""Runtime of SliceGPT-sliced and structurally pruned models whose shapes a stock architecture
cannot express (per-layer hidden, FFN or head widths).

A sliced decoder layer keeps its architecture's modules, with smaller weights, plus two shortcut
matrices on the residual path (per-layer rotations: the residual entering a block lives in the
previous block's basis). Norms are scale-free RMS norms with a fixed divisor (the original hidden
size), so that slicing the residual does not change the scale of what the next layer sees.

This file is copied into every such model folder and named in config.json's auto_map, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it; it imports only
torch and transformers. Which module is which (norms, attention, MLP) comes from config.json
("sparsellm_slicing"), written by sparsellm's architecture adapter."""
from __future__ import annotations

import types

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# per-layer structured widths (apply_widths): these families; per-layer SliceGPT rotations (apply_structure): the
# first six (the others' extra norms, residual multipliers or fused projections are refused by their adapters)
SLICING_MODEL_TYPES = ("llama", "mistral", "qwen2", "opt", "qwen3", "smollm3")
BASE_MODEL_TYPES = SLICING_MODEL_TYPES + ("gemma2", "gemma3_text", "granite", "olmo2", "phi3")
PREFIX = "sparsellm_sliced_"


def _get(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


class RMSN(nn.Module):
    """x / sqrt(sum(x²) / mean_dim + eps), optionally times a weight. mean_dim stays the original
    hidden size after slicing (the dropped directions carried little energy)."""

    def __init__(self, mean_dim: int, eps: float, dim: int | None = None):
        super().__init__()
        self.mean_dim, self.eps = mean_dim, eps
        self.weight = None if dim is None else nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.mean_dim + self.eps)
        x = x.to(dtype)
        return x if self.weight is None else self.weight * x

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


def sliced_layer_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """pre-norm block: h + attn(norm1(h)), then h + mlp(norm2(h)), with the residual rotated into
    the block output's basis by the shortcut matrices (absent = identity)."""
    names = self.sparsellm_names
    kwargs.pop("use_cache", None)
    kwargs.pop("output_attentions", None)
    residual = hidden_states if self.attn_shortcut_Q is None else hidden_states @ self.attn_shortcut_Q
    out = _get(self, names["attn"])(hidden_states=_get(self, names["norm1"])(hidden_states), **kwargs)
    hidden_states = residual + (out[0] if isinstance(out, tuple) else out)
    residual = hidden_states if self.mlp_shortcut_Q is None else hidden_states @ self.mlp_shortcut_Q
    x = _get(self, names["norm2"])(hidden_states)
    for step in names["mlp"]:  # e.g. ["mlp"] (Llama) or ["fc1", "activation_fn", "fc2"] (OPT)
        x = _get(self, step)(x)
    return residual + x


def _resize_linear(lin: nn.Linear, in_features: int | None = None, out_features: int | None = None, bias: bool | None = None):
    i, o = in_features or lin.in_features, out_features or lin.out_features
    dev, dtype = lin.weight.device, lin.weight.dtype
    if (o, i) != tuple(lin.weight.shape):
        lin.weight = nn.Parameter(torch.empty(o, i, device=dev, dtype=dtype), requires_grad=lin.weight.requires_grad)
    lin.in_features, lin.out_features = i, o
    if bias or (lin.bias is not None and lin.bias.shape[0] != o):
        lin.bias = nn.Parameter(torch.zeros(o, device=dev, dtype=dtype), requires_grad=lin.weight.requires_grad)


def make_sliced_layer(layer: nn.Module, names: dict) -> None:
    """Switch a decoder layer to the sliced forward (identity shortcuts until set)."""
    if getattr(layer, "sparsellm_names", None) is None:
        layer.sparsellm_names = names
        layer.attn_shortcut_Q = None
        layer.mlp_shortcut_Q = None
        layer.forward = types.MethodType(sliced_layer_forward, layer)


def apply_structure(model: nn.Module, s: dict) -> None:
    """Give a freshly built model the shapes described by config.sparsellm_slicing (weights are
    uninitialized: from_pretrained fills them)."""
    names = s["names"]
    dtype = next(model.parameters()).dtype
    for path in names["embeddings"]:
        emb = _get(model, path)
        emb.weight = nn.Parameter(torch.empty(emb.weight.shape[0], s["embedding_dim"], device=emb.weight.device, dtype=dtype))
        emb.embedding_dim = s["embedding_dim"]
    for layer, d in zip(_get(model, names["layers"]), s["layers"]):
        for n in names["attn_in"]:
            _resize_linear(_get(layer, n), in_features=d["in"])
        _resize_linear(_get(layer, names["attn_out"]), out_features=d["mid"])
        for n in names["mlp_in"]:
            _resize_linear(_get(layer, n), in_features=d["mid"])
        _resize_linear(_get(layer, names["mlp_out"]), out_features=d["out"])
        for key in ("norm1", "norm2"):
            parent, _, attr = names[key].rpartition(".")
            setattr(_get(layer, parent) if parent else layer, attr, RMSN(s["mean_dim"], s["eps"]))
        make_sliced_layer(layer, names)
        if d["shortcuts"]:
            dev = next(layer.parameters()).device
            layer.attn_shortcut_Q = nn.Parameter(torch.empty(d["in"], d["mid"], device=dev, dtype=dtype), requires_grad=False)
            layer.mlp_shortcut_Q = nn.Parameter(torch.empty(d["mid"], d["out"], device=dev, dtype=dtype), requires_grad=False)
    parent, _, attr = names["final_norm"].rpartition(".")
    setattr(_get(model, parent), attr, RMSN(s["mean_dim"], s["eps"], s["head_dim"] if s.get("final_norm_weight") else None))
    head = _get(model, names["lm_head"])
    _resize_linear(head, in_features=s["head_dim"], bias=s.get("head_bias", False))


def apply_widths(model: nn.Module, s: dict) -> None:
    """Per-layer widths of structured pruning (config.sparsellm_structure): FFN channels, and KV groups
    (a key/value head with the kv_group_size query heads that share it; head_dim is unchanged)."""
    names, hd, rep = s["names"], s["head_dim"], s["kv_group_size"]
    ffn_in = names.get("ffn_in") or [names["gate"], names["up"]]  # the first releases named gate and up
    fused = names.get("fused", {})  # a fused gate_up_proj (Phi-3): both halves keep the same channels
    for layer, d in zip(_get(model, s["layers_path"]), s["layers"]):
        for n in ffn_in:
            _resize_linear(_get(layer, n), out_features=fused.get(n, 1) * d["intermediate_size"])
        _resize_linear(_get(layer, names["down"]), in_features=d["intermediate_size"])
        q, kv = d["kv_groups"] * rep * hd, d["kv_groups"] * hd
        for n in (names["k"], names["v"]):
            if n not in fused:  # fused q/k/v keep their heads (the adapter refuses head removal there)
                _resize_linear(_get(layer, n), out_features=kv)
        if names["q"] not in fused:
            _resize_linear(_get(layer, names["q"]), out_features=q)
            _resize_linear(_get(layer, names["o"]), in_features=q)
        for attr in names.get("head_count_attrs", ()):
            setattr(_get(layer, names["attn"]), attr, d["kv_groups"] * rep)
        for n, which in names.get("projection_norms", {}).items():  # norms over a whole projection (OLMo-2)
            norm = _get(layer, n)
            width = q if which == "q" else kv
            if norm.weight.shape[0] != width:
                norm.weight = nn.Parameter(torch.empty(width, device=norm.weight.device, dtype=norm.weight.dtype))


def base_model_type(config_dict: dict) -> str:
    """The architecture a sliced and/or structurally pruned config.json builds on."""
    return (config_dict.get("sparsellm_slicing") or config_dict.get("sparsellm_structure"))["base_model_type"]


def _define(base: str) -> None:
    """SlicedXConfig / SlicedXForCausalLM for a base architecture, as module globals (auto_map names)."""
    config_cls = transformers.CONFIG_MAPPING[base]
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base])
    stem = model_cls.__name__.removesuffix("ForCausalLM")
    cfg = type(f"Sliced{stem}Config", (config_cls,), {"model_type": PREFIX + base, "__module__": __name__})

    def __init__(self, config):
        model_cls.__init__(self, config)
        if getattr(config, "sparsellm_slicing", None):
            apply_structure(self, config.sparsellm_slicing)
        if getattr(config, "sparsellm_structure", None):
            apply_widths(self, config.sparsellm_structure)

    mdl = type(f"Sliced{stem}ForCausalLM", (model_cls,), {"config_class": cfg, "__init__": __init__, "__module__": __name__})
    globals()[cfg.__name__], globals()[mdl.__name__] = cfg, mdl


for _base in BASE_MODEL_TYPES:
    _define(_base)


def class_names(base: str) -> tuple[str, str]:
    stem = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base].removesuffix("ForCausalLM")
    return f"Sliced{stem}Config", f"Sliced{stem}ForCausalLM"


def model_class(config_dict: dict):
    """The causal-LM class for a sliced config.json, from this module (no remote code needed)."""
    return globals()[class_names(config_dict["model_type"].removeprefix(PREFIX))[1]]
