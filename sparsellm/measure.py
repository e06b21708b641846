"""Counting what compression did: exact zeros of the decoder Linears per layer and overall, parameters,
and what share of the dense model's decoder weights is gone. Used by every memory mode (a model
streamed from disk or offloaded is counted layer by layer as the walk loads and releases it) and read
by the report; nothing here renders."""
from __future__ import annotations

import torch
from torch import nn

from .loading.experts import expert_matrices
from .loading.adapters import Adapter


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the head is the input embeddings' matrix."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None:
        return False
    if inp.weight is out.weight:
        return True
    # accelerate's hooks give an offloaded pair two parameters each time they bring it in: the config says
    hooked = any(getattr(m, "_hf_hook", None) is not None for m in (inp, out))
    return hooked and bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """Every parameter name -> the first name of the same tensor (a tied head -> the embedding it shares)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}


def parameters(model: nn.Module) -> int:
    """Parameters of the model, a tied pair once (also where accelerate's hooks keep it as two objects)."""
    n = sum(p.numel() for p in model.parameters())
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and out.weight is not inp.weight and tied_embeddings(model):
        n -= out.weight.numel()
    return n


def layer_matrices(layer: nn.Module, adapter: Adapter | None = None) -> dict[str, torch.Tensor]:
    """Each Linear weight of a decoder layer and, with the family's `adapter`, each expert's matrices (2-D
    views of the experts' 3-D parameters, named as recipes and reports name them: mlp.experts.<e>.up_proj)."""
    out = {name: mod.weight for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
    if adapter is not None:
        for path, experts in adapter.expert_modules(layer).items():
            out.update({n: m.weight for n, m in expert_matrices(experts, path).items()})
    return out


@torch.no_grad()
def layer_zeros(layer: nn.Module, adapter: Adapter | None = None) -> dict[str, tuple[int, int]]:
    """(exact zeros, weights) of each Linear weight (and expert matrix) in a decoder layer."""
    return {name: (int((w == 0).sum()), w.numel()) for name, w in layer_matrices(layer, adapter).items()}


def sparsity_summary(model: nn.Module, adapter: Adapter, zeros: list[dict[str, tuple[int, int]]] | None = None) -> dict:
    """Fraction of exact zeros in the Linear weights of the decoder layers, overall/per layer/per module.
    `zeros`: layer_zeros of every decoder layer, counted earlier (a low-memory run's layers are on disk)."""
    if zeros is None:
        zeros = [layer_zeros(layer, adapter) for layer in adapter.layers(model)]
    per_layer, per_module = [], {}
    total_zero = total = 0
    for i, counts in enumerate(zeros):
        lz = ln = 0
        for name, (z, n) in counts.items():
            per_module[f"{adapter.layer_prefix(i)}.{name}"] = z / n
            lz, ln = lz + z, ln + n
        per_layer.append({"layer": i, "sparsity": lz / ln if ln else 0.0, "params": ln})
        total_zero, total = total_zero + lz, total + ln
    return {"overall": total_zero / total if total else 0.0, "params": total,
            "per_layer": per_layer, "per_module": per_module}


def nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def removed(summary: dict, dense: dict) -> None:
    """Per layer and overall: 1 - nonzero decoder Linear weights now / their number in the dense model
    (= sparsity when only pruned; also counts rows and columns SliceGPT deleted)."""
    for now, before in zip(summary["per_layer"], dense["per_layer"]):
        now["params_before"] = before["params"]
        now["removed"] = 1 - now["params"] * (1 - now["sparsity"]) / before["params"] if before["params"] else 0.0
    summary["params_before"] = dense["params"]
    summary["overall_before"] = dense["overall"]
    summary["removed"] = 1 - summary["params"] * (1 - summary["overall"]) / dense["params"] if dense["params"] else 0.0
