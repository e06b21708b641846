"""Per-architecture knowledge: where the decoder layers live, what runs before them, and the order
of the Linear layers inside a decoder layer. Methods never name architecture modules themselves.

An adapter is mostly a record; where a record is not enough it holds code (norm conventions, fused
projections, per-layer attention kinds, the head's logit transform, which methods apply and why not).
Everything a method needs to know about a family is asked of its adapter, so the family × method
support table (`support_matrix`) and the refusals come from the same place."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


# architectures the runtime for per-layer shapes (modeling_sliced.py) builds on, for per-layer structured widths
# ("structure") or per-layer SliceGPT rotations ("slicing"); imported lazily there
def _runtime_types(kind: str) -> tuple[str, ...]:
    from .modeling_sliced import BASE_MODEL_TYPES, SLICING_MODEL_TYPES

    return SLICING_MODEL_TYPES if kind == "slicing" else BASE_MODEL_TYPES


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
    # ---- added with the families of issue 17 (all optional: the Llama and OPT records are unchanged) ----
    # GGUF `general.architecture` names of this family where they differ from the model types
    gguf_architectures: tuple[str, ...] = ()
    # RMSNorm scale convention: y = x̂ · (norm_offset + weight); Gemma stores weight - 1 (offset 1)
    norm_offset: float = 0.0
    # norms on a block's output before it joins the residual (Gemma: post-attention/post-feedforward,
    # OLMo-2: its only norms); a residual stream with these is not rotation invariant
    post_norms: tuple[str, ...] = ()
    # Linears whose output rows stack several projections: (layer-relative name, "qkv" or "gate_up")
    fused: tuple[tuple[str, str], ...] = ()
    # norms over a whole projection's output, all heads at once (OLMo-2 q_norm/k_norm): (name, "q" or "k");
    # removing KV groups removes their entries
    projection_norms: tuple[tuple[str, str], ...] = ()
    # norms outside the residual stream whose epsilon is config.rms_norm_eps too (Qwen3 q_norm/k_norm): a
    # stock export after SliceGPT's uniform slicing, which rescales that epsilon, gives them the new one
    config_eps_norms: tuple[str, ...] = ()
    # the config key listing each layer's attention kind ("full_attention", "sliding_attention")
    layer_types_key: str = ""
    # rotary tables differ between attention kinds (Gemma 3: local and global RoPE bases)
    rotary_per_kind: bool = False
    # the model expects a BOS token at the start of every sequence (perplexity chunks must start with it)
    needs_bos: bool = False
    # logits = cap · tanh(logits / cap) with cap = config[logit_softcap_key] (Gemma 2)
    logit_softcap_key: str = ""
    # logits = logits / config[logits_divisor_key] (Granite)
    logits_divisor_key: str = ""
    # Linears inside the decoder layers that no method may touch (router and shared-expert gates)
    dense_linears: tuple[str, ...] = ()
    # mixture of experts: the layer-relative path of the module holding the experts as 3-D parameters
    # (calibrate/experts.py: gate_up_proj (E, 2I, H), down_proj (E, H, I)), in the layers that have one
    experts: str = ""
    # how the checkpoint stores them (transformers' save_pretrained splits the fused parameters): one 2-D tensor per
    # expert and matrix at this layer-relative template, its {part} renamed by expert_store_parts (Mixtral: w1, w3,
    # w2); and layer-relative module prefixes renamed on disk (Mixtral: mlp.gate. is block_sparse_moe.gate.)
    expert_store: str = "mlp.experts.{e}.{part}"
    expert_store_parts: tuple[tuple[str, str], ...] = ()
    store_renames: tuple[tuple[str, str], ...] = ()
    # one-line reasons a method family does not apply (empty: it does)
    slice_refusal: str = ""
    heads_refusal: str = ""
    structure_refusal: str = ""
    learn_refusal: str = ""

    def is_attention(self, name: str) -> bool:
        """Whether a Linear (full or layer-relative name) belongs to self-attention: the first two
        true-sequential groups (q/k/v and the output projection)."""
        return any(name == a or name.endswith("." + a) for g in self.sequential_groups[:2] for a in g)

    def expert_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        """{layer-relative path: experts module} of a decoder layer (empty for a dense layer or family)."""
        mod = _get(layer, self.experts) if self.experts else None
        return {self.experts: mod} if mod is not None else {}

    def stored_module(self, name: str) -> str:
        """The layer-relative name the checkpoint stores a module or parameter under: an expert matrix's view
        name (mlp.experts.3.up_proj) becomes its stored one (Mixtral: block_sparse_moe.experts.3.w3)."""
        if self.experts and name.startswith(self.experts + "."):
            e, _, part = name[len(self.experts) + 1:].partition(".")
            if e.isdigit() and part in ("gate_proj", "up_proj", "down_proj"):
                return self.expert_store.format(e=int(e), part=dict(self.expert_store_parts).get(part, part))
        for memory_prefix, disk_prefix in self.store_renames:
            if name.startswith(memory_prefix):
                return disk_prefix + name[len(memory_prefix):]
        return name

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def pre_layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for p in self.pre_layer_paths if (m := _get(model, p)) is not None]

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for p in self.head_paths if (m := _get(model, p)) is not None]

    # ---- per-layer forward arguments -----------------------------------------------------------

    def attention_kinds(self, config) -> list[str]:
        """Each decoder layer's attention kind as the model's forward keys its masks (and, with
        rotary_per_kind, its position embeddings): layers of one kind take the same keyword arguments."""
        n = config.num_hidden_layers
        kinds = list(getattr(config, self.layer_types_key, None) or []) if self.layer_types_key else []
        return kinds[:n] if len(kinds) >= n else ["full_attention"] * n

    # ---- the head ------------------------------------------------------------------------------

    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last decoder layer's output as the causal-LM forward computes them: the head
        modules in order, then the family's logit transform (Gemma 2 soft-capping, Granite scaling)."""
        for m in self.head_modules(model):
            hidden = m(hidden)
        cfg = model.config
        if self.logits_divisor_key:
            hidden = hidden / getattr(cfg, self.logits_divisor_key)
        cap = getattr(cfg, self.logit_softcap_key, None) if self.logit_softcap_key else None
        if cap is not None:
            hidden = torch.tanh(hidden / cap) * cap
        return hidden

    # ---- fused projections ---------------------------------------------------------------------

    def fused_kind(self, name: str) -> str | None:
        """"qkv" or "gate_up" for a fused Linear (layer-relative or full name), else None."""
        for n, kind in self.fused:
            if name == n or name.endswith("." + n):
                return kind
        return None

    def fused_parts(self, name: str, config) -> list[tuple[str, slice]]:
        """The projections a Linear's output rows stack, as (part name, row range); one part spanning
        every row for a Linear that is not fused. Row ranges follow the family's forward (Phi-3 splits
        qkv_proj as q | k | v and gate_up_proj as gate | up)."""
        kind = self.fused_kind(name)
        if kind is None:
            return [(name, slice(None))]
        stem = name.rpartition(".")[0]
        join = (lambda p: f"{stem}.{p}") if stem else (lambda p: p)
        if kind == "gate_up":
            i = getattr(config, self.ffn_width_key)
            return [(join("gate_proj"), slice(0, i)), (join("up_proj"), slice(i, 2 * i))]
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // heads
        q, k = heads * hd, kv * hd
        return [(join("q_proj"), slice(0, q)), (join("k_proj"), slice(q, q + k)), (join("v_proj"), slice(q + k, q + 2 * k))]

    # ---- what applies ----------------------------------------------------------------------------

    def slicing_names(self) -> dict:
        """Module names for the sliced runtime (written to config.json, see modeling_sliced.py)."""
        attn_in, (attn_out,), mlp_in, (mlp_out,) = self.sequential_groups
        return {"layers": self.layers_path, "norm1": self.norms[0], "norm2": self.norms[1], "attn": self.attention,
                "mlp": list(self.mlp_call), "attn_in": list(attn_in), "attn_out": attn_out, "mlp_in": list(mlp_in),
                "mlp_out": mlp_out, "embeddings": list(self.embedding_paths), "final_norm": self.final_norm,
                "lm_head": self.lm_head}

    def per_layer_runtime(self, kind: str) -> bool:
        """Whether per-layer shapes of `kind` ("structure": structured per-layer widths; "slicing": SliceGPT
        per-layer rotations) can be written: the runtime file (modeling_sliced.py) knows every model type of
        this family for it."""
        return all(t in _runtime_types(kind) for t in self.model_types)

    def _runtime_refusal(self, what: str, kind: str, fix: str) -> str:
        return (f"{what} needs sparsellm's runtime for per-layer shapes (modeling_sliced.py), which covers only "
                f"{', '.join(_runtime_types(kind))} for it so far; use {fix}")

    def check_sliceable(self, model: nn.Module, spec=None) -> None:
        """SliceGPT needs pre-norm blocks whose residual stream is the embeddings' sum. With the stage's
        `spec`, also whether its rotation can be written for this family."""
        cfg = model.config
        if self.slice_refusal:
            raise UnsupportedArchitectureError(self.slice_refusal)
        if getattr(cfg, "do_layer_norm_before", True) is False:
            raise UnsupportedArchitectureError(f"SliceGPT needs pre-norm blocks; this {cfg.model_type} model normalizes "
                                               "after each block (e.g. opt-350m)")
        if any(_get(model, p) is not None for p in ("model.decoder.project_in", "model.decoder.project_out")):
            raise UnsupportedArchitectureError("SliceGPT: models with project_in/project_out (word_embed_proj_dim != "
                                               "hidden_size) are not supported; prune this model with a method "
                                               "that keeps its shapes (e.g. --method wanda) instead")
        if spec is not None and spec.rotation != "uniform" and not self.per_layer_runtime("slicing"):
            raise UnsupportedArchitectureError(self._runtime_refusal("SliceGPT rotation: per-layer", "slicing",
                                                                     "rotation: uniform (a stock architecture)"))

    def structure_names(self, model: nn.Module) -> dict:
        """Module names and head geometry for structured pruning (FFN channels, whole KV groups).
        A fused Linear appears under each name it stands for (Phi-3: q, k and v are all qkv_proj);
        names["fused"] maps it to its part count."""
        cfg = model.config
        if self.structure_refusal:
            raise UnsupportedArchitectureError(self.structure_refusal)
        if not self.ffn_in:
            raise UnsupportedArchitectureError(f"structured pruning does not support {cfg.model_type} models yet")
        attn_in, (o,), _, (down,) = self.sequential_groups
        q, k, v = attn_in if len(attn_in) == 3 else attn_in * 3
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return {"q": q, "k": k, "v": v, "o": o, "ffn_in": list(self.ffn_in), "down": down, "attn": self.attention,
                "heads": heads, "kv_heads": kv, "head_dim": head_dim, "intermediate": getattr(cfg, self.ffn_width_key),
                "width_key": self.ffn_width_key, "head_count_attrs": list(self.head_count_attrs),
                "config_head_dim": self.config_head_dim,
                "fused": {n: (2 if kind == "gate_up" else 3) for n, kind in self.fused},
                "projection_norms": {n: which for n, which in self.projection_norms}}

    def check_structure(self, model: nn.Module, spec) -> None:
        """Refuse, before any work, a structure stage whose surgery this family cannot take."""
        self.structure_names(model)
        if spec.heads and self.heads_refusal:
            raise UnsupportedArchitectureError(self.heads_refusal)
        if not spec.uniform and not self.per_layer_runtime("structure"):
            raise UnsupportedArchitectureError(self._runtime_refusal("structure with uniform: false", "structure",
                                                                     "uniform: true (a stock architecture)"))

    def check_learn(self) -> None:
        """Refuse, before any work, a learn stage (MaskLLM) this family cannot take."""
        if self.learn_refusal:
            raise UnsupportedArchitectureError(self.learn_refusal)

    def groups_for(self, names: list[str]) -> list[list[str]]:
        """Split a layer's target Linear names into the true-sequential order; unknown names go last.
        A group's entries may be globs (an expert's matrices: mlp.experts.*.gate_proj)."""
        groups, seen = [], set()
        for g in self.sequential_groups:
            sel = [n for n in names if n not in seen and any(fnmatch.fnmatchcase(n, p) for p in g)]
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

# Qwen3: per-head RMS norms on q and k (q_norm/k_norm over head_dim) inside attention; otherwise Llama
QWEN3 = replace(LLAMA, name="qwen3", model_types=("qwen3",), layer_types_key="layer_types",
                config_eps_norms=("self_attn.q_norm", "self_attn.k_norm"))

# SmolLM3: some layers skip rotary embeddings (config.no_rope_layers, read by the attention module itself)
SMOLLM3 = replace(LLAMA, name="smollm3", model_types=("smollm3",), layer_types_key="layer_types")

_GEMMA_SLICE = ("SliceGPT needs one normalised residual stream: {family} also normalises each block's output "
                "(post-attention/post-feedforward norms), which no rotation of the residual passes through "
                "exactly; use structured pruning (structure: cfsp/wanda-sp/magnitude) or unstructured/N:M pruning")

# Gemma 2 / Gemma 3: four norms per layer, scale 1 + weight, embeddings scaled by sqrt(hidden) inside the
# embedding module, alternating sliding-window and global attention (config.layer_types); Gemma 2 soft-caps
# attention scores (inside attention) and the final logits (after lm_head); Gemma 3 has per-head q/k norms and
# separate RoPE bases for local and global layers
GEMMA2 = replace(LLAMA, name="gemma2", model_types=("gemma2",), gguf_architectures=("gemma2",), norm_offset=1.0,
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                 norms=("input_layernorm", "pre_feedforward_layernorm"), layer_types_key="layer_types",
                 needs_bos=True, logit_softcap_key="final_logit_softcapping",
                 slice_refusal=_GEMMA_SLICE.format(family="Gemma 2"))
GEMMA3 = replace(GEMMA2, name="gemma3", model_types=("gemma3_text",), gguf_architectures=("gemma3",),
                 rotary_per_kind=True, logit_softcap_key="final_logit_softcapping",
                 slice_refusal=_GEMMA_SLICE.format(family="Gemma 3"))

# Phi-3 / Phi-4: q, k, v fused in qkv_proj (rows q | k | v), gate and up fused in gate_up_proj (rows gate | up)
PHI3 = replace(LLAMA, name="phi3", model_types=("phi3",), gguf_architectures=("phi3",),
               sequential_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                                  ("mlp.down_proj",)),
               ffn_in=("mlp.gate_up_proj",), fused=(("self_attn.qkv_proj", "qkv"), ("mlp.gate_up_proj", "gate_up")),
               heads_refusal="structured heads: Phi-3 splits its fused qkv_proj by config.num_attention_heads in every "
                             "forward, so KV groups cannot be removed layer by layer; use heads: 0 (FFN channels only)")

# OLMo-2: no pre-norms; RMS norms after attention and after the MLP, and q_norm/k_norm over the whole q/k
# projection (all heads together)
OLMO2 = replace(LLAMA, name="olmo2", model_types=("olmo2",), post_norms=("post_attention_layernorm",
                                                                      "post_feedforward_layernorm"),
                norms=("", ""), projection_norms=(("self_attn.q_norm", "q"), ("self_attn.k_norm", "k")),
                slice_refusal="SliceGPT needs one normalised residual stream: OLMo-2 normalises each block's output "
                              "(norms after attention and after the MLP) instead of its input, which no rotation of "
                              "the residual passes through exactly; use structured pruning (structure: cfsp/wanda-sp/"
                              "magnitude) or unstructured/N:M pruning")

# Granite: embedding_multiplier (in the model's forward, before layer 0), attention_multiplier (attention
# scale), residual_multiplier (each block's output), logits divided by logits_scaling
GRANITE = replace(LLAMA, name="granite", model_types=("granite",), logits_divisor_key="logits_scaling",
                  slice_refusal="SliceGPT: Granite scales each block's output by residual_multiplier, which SliceGPT's "
                                "rotated block walk does not model; use structured pruning (structure: cfsp/wanda-sp/"
                                "magnitude) or unstructured/N:M pruning")

# Mixture of experts (transformers 5): `mlp.experts` holds every expert's gate/up and down matrices as two 3-D
# parameters, pruned expert by expert through 2-D views from the tokens the router sends to each expert
# (calibrate/experts.py, docs/moe.md); the router (`mlp.gate`, no Linear) and Qwen2-MoE's shared-expert gate stay
# dense; the shared expert (Qwen2-MoE) and Qwen3-MoE's dense-MLP layers are ordinary Linears.
_MOE_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
     "mlp.gate_proj", "mlp.up_proj"),
    ("mlp.experts.*.down_proj", "mlp.shared_expert.down_proj", "mlp.down_proj"),
)
_MOE_SLICE = ("SliceGPT on mixture of experts: the rotation walk and the sliced runtime do not know routed expert "
              "blocks; use unstructured or N:M pruning (prune: wanda/sparsegpt), which works per expert")
_MOE_STRUCTURE = ("structured pruning of mixture of experts: removing channels or heads would have to cut every expert "
                  "and the router consistently, which sparsellm does not do; use unstructured or N:M pruning "
                  "(prune: wanda/sparsegpt), which works per expert")
_MOE_LEARN = ("MaskLLM on mixture of experts: it learns masks of Linear layers and the experts are 3-D parameters; "
              "use prune: sparsegpt or wanda with pattern 2:4, which works per expert")


def _moe(name: str, model_type: str, **kw) -> Adapter:
    return replace(LLAMA, name=name, model_types=(model_type,), sequential_groups=_MOE_GROUPS, experts="mlp.experts",
                   layer_types_key="layer_types", ffn_in=(), slice_refusal=_MOE_SLICE, structure_refusal=_MOE_STRUCTURE,
                   learn_refusal=_MOE_LEARN, **kw)


MIXTRAL = _moe("mixtral", "mixtral", expert_store="block_sparse_moe.experts.{e}.{part}",
               expert_store_parts=(("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")),
               store_renames=(("mlp.", "block_sparse_moe."),))
QWEN2_MOE = _moe("qwen2-moe", "qwen2_moe", gguf_architectures=("qwen2moe",), dense_linears=("mlp.shared_expert_gate",))
QWEN3_MOE = _moe("qwen3-moe", "qwen3_moe", gguf_architectures=("qwen3moe",),
                 config_eps_norms=("self_attn.q_norm", "self_attn.k_norm"))

ADAPTERS = (LLAMA, OPT, QWEN3, SMOLLM3, GEMMA2, GEMMA3, PHI3, OLMO2, GRANITE, MIXTRAL, QWEN2_MOE, QWEN3_MOE)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)

# the mixture-of-experts families (experts as 3-D parameters; see docs/moe.md)
MOE_MODEL_TYPES = tuple(t for a in ADAPTERS if a.experts for t in a.model_types)


def gguf_model_type(architecture: str) -> str | None:
    """The supported model type of a GGUF `general.architecture` name, or None."""
    for a in ADAPTERS:
        if architecture in a.model_types:
            return architecture
        if architecture in a.gguf_architectures:
            i = a.gguf_architectures.index(architecture)
            return a.model_types[min(i, len(a.model_types) - 1)]
    return None


def get_adapter(model_or_type) -> Adapter:
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}; use a model of a supported architecture: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


# ---- the support matrix ----------------------------------------------------------------------------

# (column, what it covers); the per-Linear methods apply to every Linear of every family (fused ones
# included: their rows are their parts' rows; each expert's matrices of a mixture of experts, from the tokens
# routed to it), so only the methods that change shapes and MaskLLM can be refused
MATRIX_COLUMNS = (
    ("magnitude", "unstructured and N:M (a fused Linear's rows are its parts' rows; experts one by one)"),
    ("Wanda", "unstructured and N:M (experts: from the tokens routed to each)"),
    ("SparseGPT", "unstructured and N:M (experts: from the tokens routed to each)"),
    ("DSnoT", "refines any of the above"),
    ("OWL", "per-layer sparsity allocation"),
    ("MaskLLM", "learned N:M masks"),
    ("SliceGPT uniform", "one rotation: stock architecture"),
    ("SliceGPT per-layer", "per-layer rotations: runtime file"),
    ("structure FFN", "FFN channels, uniform: stock architecture"),
    ("structure heads", "whole KV groups, uniform: stock architecture"),
    ("structure per-layer", "uniform: false: runtime file"),
)


class _Spec:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _refusal(fn) -> str | None:
    try:
        fn()
    except UnsupportedArchitectureError as e:
        return str(e)
    return None


def method_support(adapter: Adapter) -> dict[str, str | None]:
    """Column -> None (applies) or the one-line refusal this family's adapter raises for it."""
    slice_probe = type("M", (), {"config": _Spec(do_layer_norm_before=True, model_type=adapter.model_types[0])})()
    structure_ok = bool(adapter.ffn_in)
    out: dict[str, str | None] = {c: None for c, _ in MATRIX_COLUMNS[:5]}
    out["MaskLLM"] = _refusal(adapter.check_learn)
    out["SliceGPT uniform"] = adapter.slice_refusal or None
    out["SliceGPT per-layer"] = out["SliceGPT uniform"] or _refusal(
        lambda: adapter.check_sliceable(slice_probe, _Spec(rotation="per-layer")))
    no_structure = adapter.structure_refusal or (
        None if structure_ok else f"structured pruning does not support {adapter.name} models yet")
    out["structure FFN"] = no_structure
    out["structure heads"] = no_structure or adapter.heads_refusal or None
    out["structure per-layer"] = no_structure or (None if adapter.per_layer_runtime("structure") else
                                                  adapter._runtime_refusal("structure with uniform: false", "structure",
                                                                           "uniform: true (a stock architecture)"))
    return out


def support_matrix() -> str:
    """The family × method table (markdown) from the adapters, with each refusal's reason as a note."""
    head = "| family (model types) | " + " | ".join(c for c, _ in MATRIX_COLUMNS) + " |"
    rule = "| --- |" + " --- |" * len(MATRIX_COLUMNS)
    rows, notes = [head, rule], []
    for a in ADAPTERS:
        cells = []
        for column, _ in MATRIX_COLUMNS:
            reason = method_support(a)[column]
            if reason is None:
                cells.append("yes")
            else:
                if reason not in notes:
                    notes.append(reason)
                cells.append(f"no [{notes.index(reason) + 1}]")
        rows.append(f"| {a.name} ({', '.join(a.model_types)}) | " + " | ".join(cells) + " |")
    legend = [f"- {c}: {what}" for c, what in MATRIX_COLUMNS]
    return "\n".join(rows + [""] + [f"[{i + 1}] {n}" for i, n in enumerate(notes)] + ["", "Columns:"] + legend) + "\n"
