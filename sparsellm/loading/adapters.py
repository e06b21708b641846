"""Per-architecture knowledge: where the decoder layers live, what runs before them, and the order
of the Linear layers inside a decoder layer. Methods never name architecture modules themselves."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedArchitectureError


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str
    # modules that run before the first decoder layer (embeddings, positions, rotary tables)
    pre_layer_paths: tuple[str, ...]
    # true-sequential order: each group sees inputs produced by the already-compressed earlier groups
    sequential_groups: tuple[tuple[str, ...], ...]
    # modules that turn the last decoder layer's output into logits, in order
    head_paths: tuple[str, ...] = ()
    # what SliceGPT needs to see a pre-norm block: h + attn(norm1(h)), then h + mlp(norm2(h))
    norm_kind: str = "rms"  # "rms" (scale only) or "layernorm" (mean-centering, scale and bias)
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    attention: str = "self_attn"
    mlp_call: tuple[str, ...] = ("mlp",)  # applied in order to norm2's output
    embedding_paths: tuple[str, ...] = ()  # whose outputs add up to the residual stream
    final_norm: str = ""
    lm_head: str = "lm_head"
    # structured pruning: the Linears that make FFN channels (gate/up, or fc1), the config key of the FFN
    # width, and attention attributes that hold the head count (read by forward, so updated on surgery)
    ffn_in: tuple[str, ...] = ()
    ffn_width_key: str = "intermediate_size"
    head_count_attrs: tuple[str, ...] = ()
    config_head_dim: bool = True  # the stock config states head_dim apart from hidden_size / heads

    def is_attention(self, name: str) -> bool:
        """Whether a Linear (full or layer-relative name) belongs to self-attention: the first two
        true-sequential groups (q/k/v and the output projection)."""
        return any(name == a or name.endswith("." + a) for g in self.sequential_groups[:2] for a in g)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def pre_layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for p in self.pre_layer_paths if (m := _get(model, p)) is not None]

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for p in self.head_paths if (m := _get(model, p)) is not None]

    def slicing_names(self) -> dict:
        """Module names for the sliced runtime (written to config.json, see modeling_sliced.py)."""
        attn_in, (attn_out,), mlp_in, (mlp_out,) = self.sequential_groups
        return {"layers": self.layers_path, "norm1": self.norms[0], "norm2": self.norms[1], "attn": self.attention,
                "mlp": list(self.mlp_call), "attn_in": list(attn_in), "attn_out": attn_out, "mlp_in": list(mlp_in),
                "mlp_out": mlp_out, "embeddings": list(self.embedding_paths), "final_norm": self.final_norm,
                "lm_head": self.lm_head}

    def check_sliceable(self, model: nn.Module) -> None:
        """SliceGPT needs pre-norm blocks whose residual stream is the embeddings' sum."""
        cfg = model.config
        if getattr(cfg, "do_layer_norm_before", True) is False:
            raise UnsupportedArchitectureError(f"SliceGPT needs pre-norm blocks; this {cfg.model_type} model normalizes "
                                               "after each block (e.g. opt-350m)")
        if any(_get(model, p) is not None for p in ("model.decoder.project_in", "model.decoder.project_out")):
            raise UnsupportedArchitectureError("SliceGPT: models with project_in/project_out (word_embed_proj_dim != "
                                               "hidden_size) are not supported; prune this model with a method "
                                               "that keeps its shapes (e.g. --method wanda) instead")

    def structure_names(self, model: nn.Module) -> dict:
        """Module names and head geometry for structured pruning (FFN channels, whole KV groups)."""
        cfg = model.config
        if not self.ffn_in:
            raise UnsupportedArchitectureError(f"structured pruning does not support {cfg.model_type} models yet")
        (q, k, v), (o,), _, (down,) = self.sequential_groups
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return {"q": q, "k": k, "v": v, "o": o, "ffn_in": list(self.ffn_in), "down": down, "attn": self.attention,
                "heads": heads, "kv_heads": kv, "head_dim": head_dim, "intermediate": getattr(cfg, self.ffn_width_key),
                "width_key": self.ffn_width_key, "head_count_attrs": list(self.head_count_attrs),
                "config_head_dim": self.config_head_dim}

    def groups_for(self, names: list[str]) -> list[list[str]]:
        """Split a layer's target Linear names into the true-sequential order; unknown names go last."""
        groups, seen = [], set()
        for g in self.sequential_groups:
            sel = [n for n in names if n in g]
            seen.update(sel)
            if sel:
                groups.append(sel)
        rest = [n for n in names if n not in seen]
        return groups + ([rest] if rest else [])


LLAMA = Adapter(
    name="llama-family",
    model_types=("llama", "mistral", "qwen2"),
    layers_path="model.layers",
    pre_layer_paths=("model.embed_tokens", "model.rotary_emb"),
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    head_paths=("model.norm", "lm_head"),
    embedding_paths=("model.embed_tokens",),
    final_norm="model.norm",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
)

OPT = Adapter(
    name="opt",
    model_types=("opt",),
    layers_path="model.decoder.layers",
    pre_layer_paths=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    head_paths=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    norm_kind="layernorm",
    norms=("self_attn_layer_norm", "final_layer_norm"),
    mlp_call=("fc1", "activation_fn", "fc2"),
    embedding_paths=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    ffn_in=("fc1",),
    ffn_width_key="ffn_dim",
    head_count_attrs=("num_heads",),  # OPTAttention reshapes with self.num_heads
    config_head_dim=False,  # head_dim = hidden_size / heads: fewer heads need the runtime file
)

ADAPTERS = (LLAMA, OPT)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model_or_type) -> Adapter:
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}; use a model of a supported architecture: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )
