"""Mixture of experts (sparsellm/calibrate/experts.py) on a tiny Qwen3-MoE: each expert's matrices as writable
2-D views, per-expert statistics equal to a hand computation where the routing is known, exact sparsity of
every expert matrix, routing unchanged at 0 %, and the data-free fallback for experts the router starves."""
from __future__ import annotations

import logging

import pytest
import torch

from sparsellm.calibrate.experts import ExpertStats, data_free_stats, routed_tokens
from sparsellm.loading.experts import ExpertMatrix, expert_matrices, expert_shapes
from sparsellm.compress import build_method
from sparsellm.compress.base import Target
from sparsellm.compress.magnitude import magnitude_mask
from sparsellm.recipe import recipe_from_dict

E, H, I, K = 4, 16, 8, 2


def tiny_moe(seed: int = 0, layers: int = 1):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=H, intermediate_size=32, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=K, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3, generator=g)
    return model.eval().requires_grad_(False)


def _experts(model, layer: int = 0):
    return model.model.layers[layer].mlp.experts


def test_views_are_the_expert_matrices_and_write_through():
    model = tiny_moe()
    experts = _experts(model)
    assert expert_shapes(experts) == (E, H, I)
    views = expert_matrices(experts, "model.layers.0.mlp.experts")
    assert list(views)[:3] == [f"model.layers.0.mlp.experts.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert len(views) == 3 * E
    v = views["model.layers.0.mlp.experts.2.up_proj"]
    assert (v.out_features, v.in_features) == (I, H) and views["model.layers.0.mlp.experts.2.down_proj"].weight.shape == (H, I)
    assert torch.equal(v.weight, experts.gate_up_proj[2, I:])
    v.weight.masked_fill_(torch.ones_like(v.weight, dtype=torch.bool), 0)  # what a method does
    assert bool((experts.gate_up_proj[2, I:] == 0).all()) and bool((experts.gate_up_proj[2, :I] != 0).all())
    assert bool((experts.gate_up_proj[[0, 1, 3]] != 0).all())


def test_other_layouts_are_rejected():
    with pytest.raises(ValueError, match="expected 3-D gate_up_proj"):
        expert_shapes(torch.nn.Linear(4, 4))


def test_per_expert_statistics_equal_a_hand_computation_with_known_routing():
    """The routing is given (expert 3 gets no token, token 0 goes to experts 0 and 1, ...): each expert's input
    statistics are those of exactly its tokens, and its down_proj statistics those of act(gate·x) ⊙ up·x."""
    experts = _experts(tiny_moe())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, H, generator=g)
    idx = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1], [2, 0]])
    weights = torch.full((6, K), 0.5)
    stats = ExpertStats(experts, frozenset({"sq_norm", "hessian"})).attach()
    try:
        experts(x, idx, weights)
    finally:
        stats.detach()
    assert stats.tokens == [4, 4, 4, 0]
    for e, tokens in enumerate([[0, 2, 4, 5], [0, 1, 3, 4], [1, 2, 3, 5]]):
        assert routed_tokens(idx, e).tolist() == tokens
        xe = x[tokens].double()
        assert torch.allclose(stats.inputs[e].sq_norm, (xe ** 2).mean(0))
        assert torch.allclose(stats.inputs[e].hessian, xe.T @ xe / len(tokens))
        gate, up = experts.gate_up_proj[e, :I].double(), experts.gate_up_proj[e, I:].double()
        inner = torch.nn.functional.silu(xe @ gate.T) * (xe @ up.T)
        assert torch.allclose(stats.inner[e].sq_norm, (inner ** 2).mean(0), atol=1e-6)
        assert torch.allclose(stats.inner[e].hessian, inner.T @ inner / len(tokens), atol=1e-6)
    assert stats.inputs[3].tokens == 0


def test_whole_model_forward_counts_every_routed_token():
    model = tiny_moe(layers=2)
    ids = torch.randint(2, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    collectors = [ExpertStats(_experts(model, i), frozenset({"sq_norm"})).attach() for i in range(2)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for c in collectors:
            c.detach()
    for c in collectors:
        assert sum(c.tokens) == 3 * 10 * K  # top-k picks k distinct experts per token


def _route(model, ids):
    """Router choices of every MoE layer for `ids`."""
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2].clone()))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def _prune_experts(model, ids, stage: dict, min_tokens: int = 1):
    """Per-expert pruning as the engine would run it: collect each expert's statistics from the routed
    calibration tokens, then compress every expert matrix through its view."""
    spec = recipe_from_dict({"stages": [{"prune": stage}]}).stages[0].spec
    method = build_method(spec)
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        stats = ExpertStats(experts, method.needs).attach()
        try:
            with torch.no_grad():
                model(ids, use_cache=False)
        finally:
            stats.detach()
        prefix = f"model.layers.{i}.mlp.experts"
        for name, view in expert_matrices(experts, prefix).items():
            e, part = name[len(prefix) + 1:].split(".")
            method.compress(Target(name, i, view, stats.for_matrix(int(e), part, min_tokens, prefix)))
    return method


@pytest.mark.parametrize("stage", [{"method": "wanda", "sparsity": 0.5}, {"method": "wanda", "pattern": "2:4"},
                                   {"method": "sparsegpt", "sparsity": 0.5, "scope": "row"},
                                   {"method": "sparsegpt", "pattern": "2:4"}])
def test_every_expert_matrix_gets_its_exact_sparsity(stage):
    model = tiny_moe(layers=2)
    ids = torch.randint(2, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    router_before = [layer.mlp.gate.weight.clone() for layer in model.model.layers]
    _prune_experts(model, ids, stage)
    for layer, router in zip(model.model.layers, router_before):
        assert torch.equal(layer.mlp.gate.weight, router)  # the router stays dense
        for name, view in expert_matrices(layer.mlp.experts).items():
            w = view.weight
            if "pattern" in stage:
                assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()), name
            else:
                assert bool(((w == 0).sum(1) == w.shape[1] // 2).all()), name


def test_routing_and_logits_unchanged_at_zero_sparsity():
    model = tiny_moe(layers=2)
    ids = torch.randint(2, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    routes, logits = _route(model, ids)
    _prune_experts(model, ids, {"method": "sparsegpt", "sparsity": 0.0})
    routes_after, logits_after = _route(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(routes, routes_after)) and torch.equal(logits, logits_after)


def test_starved_expert_falls_back_to_data_free_scores(caplog):
    experts = _experts(tiny_moe())
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(7))
    idx = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 2], [0, 1]])  # expert 2 sees one token, expert 3 none
    stats = ExpertStats(experts, frozenset({"sq_norm", "hessian"})).attach()
    try:
        experts(x, idx, torch.full((5, K), 0.5))
    finally:
        stats.detach()
    assert stats.tokens == [4, 5, 1, 0]
    with caplog.at_level(logging.WARNING):
        own = stats.for_matrix(0, "gate_proj", min_tokens=2)
        starved = stats.for_matrix(2, "gate_proj", min_tokens=2, name="layer 0")
        empty = stats.for_matrix(3, "down_proj", min_tokens=2, name="layer 0")
    assert own is stats.inputs[0]
    assert "expert 2 saw 1 calibration tokens" in caplog.text and "expert 3 saw 0" in caplog.text
    assert torch.equal(starved.sq_norm, torch.ones(H, dtype=torch.float64))
    assert torch.equal(empty.hessian, torch.eye(I, dtype=torch.float64))
    # Wanda on data-free statistics is magnitude per row
    spec = recipe_from_dict({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}]}).stages[0].spec
    view = expert_matrices(experts)["3.gate_proj"]
    expected = view.weight.masked_fill(magnitude_mask(view.weight, 0.5, None, "row"), 0)
    build_method(spec).compress(Target("3.gate_proj", 0, view, stats.for_matrix(3, "gate_proj", min_tokens=2)))
    assert torch.equal(view.weight, expected)


def test_data_free_stats_shapes():
    s = data_free_stats(6, frozenset({"sq_norm", "hessian", "mean"}))
    assert torch.equal(s.sq_norm, torch.ones(6, dtype=torch.float64)) and torch.equal(s.mean, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(s.hessian, torch.eye(6, dtype=torch.float64)) and isinstance(ExpertMatrix(torch.zeros(2, 3)).in_features, int)
