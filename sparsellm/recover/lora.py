"""LoRA recovery (peft) with the causal-LM loss on the calibration windows, under accelerate, merged
back into the weights so that the result is a plain model again.

Importance-guided (CFSP's IG-LoRA): the training capacity follows the coarse block importance. Each
block's adapters get rank r_i = round(rank·w_i) with w_i the block's relative importance (mean 1),
and alpha_i = alpha·r_i/rank so that the update scale alpha/r stays the same everywhere: important
blocks, which also kept more of their FFN, get more trainable parameters."""
from __future__ import annotations

import logging
import re
import time
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from ..loading.adapters import Adapter
from ..specs import Strict
from ..stage import Stage, order_rule, register, stage_kind

log = logging.getLogger(__name__)


class LoRARecover(Strict):
    """Recovery fine-tuning with LoRA on the calibration text, merged into the weights at the end."""
    method: Literal["lora"]
    steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(2, gt=0, description="calibration windows per step (per process)")
    lr: float = Field(2e-4, gt=0.0, description="peak learning rate (linear warm-up over 10 % of the steps, cosine decay)")
    rank: int = Field(8, gt=0, description="LoRA rank (the mean over blocks when importance_guided)")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scale numerator: the update is (alpha / rank)·B·A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    importance_guided: bool = Field(True, description="after CFSP: each block's rank in proportion to its coarse "
                                    "importance (the paper's IG-LoRA); otherwise the same rank everywhere")


def block_ranks(rank: int, weights: list[float] | None, n_layers: int) -> list[int]:
    """Per-block LoRA ranks: rank·w_i (w normalised to mean 1), rounded, at least 1."""
    if not weights:
        return [rank] * n_layers
    mean = sum(weights) / len(weights)
    return [max(1, round(rank * w / mean)) for w in weights]


def attach(model: nn.Module, adapter: Adapter, spec, weights: list[float] | None):
    """Wrap `model` with LoRA adapters on every Linear of the decoder layers (peft)."""
    from ..optional import require

    require("peft")
    from peft import LoraConfig, get_peft_model

    layers = adapter.layers(model)
    names = sorted({n for layer in layers for n, m in layer.named_modules() if isinstance(m, nn.Linear)})
    prefix = re.escape(adapter.layers_path)
    ranks = block_ranks(spec.rank, weights if spec.importance_guided else None, len(layers))
    pattern = {rf"{prefix}\.{i}\..+": r for i, r in enumerate(ranks)}
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                        target_modules=rf"{prefix}\.\d+\.({'|'.join(map(re.escape, names))})",
                        rank_pattern=pattern, alpha_pattern={k: spec.alpha * r / spec.rank for k, r in pattern.items()})
    return get_peft_model(model, config), ranks


def merge(peft_model) -> nn.Module:
    """Fold B·A·(alpha/r) into each base weight and drop the adapters: a plain model again."""
    model = peft_model.merge_and_unload()
    model.requires_grad_(False)
    return model.eval()


def train(peft_model, windows: torch.Tensor, spec, seed: int, device) -> dict:
    """AdamW on the adapters, linear warm-up then cosine decay; batches drawn without replacement
    from a seeded permutation of the windows (each process takes its own share under accelerate)."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=torch.device(device).type == "cpu")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=max(1, spec.steps // 10), num_training_steps=spec.steps)
    model, opt, sched = accelerator.prepare(peft_model, opt, sched)
    gen = torch.Generator().manual_seed(seed)
    rank, world, bs = accelerator.process_index, accelerator.num_processes, spec.batch_size
    order, pos, losses = torch.empty(0, dtype=torch.long), 0, []
    model.train()
    t = time.perf_counter()
    for _ in tqdm(range(spec.steps), desc="lora recovery", unit="step"):
        need = bs * world
        if pos + need > len(order):
            order, pos = torch.cat([order[pos:], torch.randperm(len(windows), generator=gen)]), 0
            while len(order) < need:
                order = torch.cat([order, torch.randperm(len(windows), generator=gen)])
        idx = order[pos + rank * bs: pos + (rank + 1) * bs]
        pos += need
        batch = windows[idx].to(accelerator.device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t
    model.eval()
    accelerator.wait_for_everyone()
    return {"steps": spec.steps, "tokens": spec.steps * bs * world * windows.shape[1], "seconds": seconds,
            "processes": world, "loss_first": losses[0], "loss_last": losses[-1],
            "loss_mean_last10": sum(losses[-10:]) / len(losses[-10:]), "unwrapped": accelerator.unwrap_model(model)}


def lora_recover(model: nn.Module, adapter: Adapter, windows: torch.Tensor, spec, seed: int, device,
                 weights: list[float] | None = None) -> dict:
    """Fine-tune `model` in place with LoRA and merge; returns the report details."""
    home = next(model.parameters()).device
    model.to(device)
    peft_model, ranks = attach(model, adapter, spec, weights)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    details = train(peft_model, windows, spec, seed, device)
    merged = merge(details.pop("unwrapped"))
    merged.to(home)
    log.info("lora recovery: %d steps, %d tokens in %.1f s, loss %.3f -> %.3f (last 10 mean)", details["steps"],
             details["tokens"], details["seconds"], details["loss_first"], details["loss_mean_last10"])
    return {**details, "ranks": ranks, "trainable_parameters": trainable}


@stage_kind
class RecoverStage(Stage):
    kind = "recover"

    def run(self, ctx) -> list[dict]:
        return self.timed(ctx, lambda: lora_recover(ctx.model, ctx.adapter, ctx.windows, self.spec, ctx.seed, ctx.device,
                                                    ctx.results.get("block_weight")))


register("recover", LoRARecover, lora_recover)


@order_rule("recover")
def _recover_after_structure(i, stages):
    kinds = [st.kind for st in stages[:i]]
    if not any(k in ("structure", "slice") for k in kinds):
        return (f"stages.{i}: a recover stage fine-tunes a structurally pruned model: put a "
                "structure (or slice) stage before it")
    if "prune" in kinds or "learn" in kinds:
        return (f"stages.{i}: a recover stage cannot follow a prune stage (merging LoRA would "
                "fill in the pruned zeros); prune after recovering")
    return None
