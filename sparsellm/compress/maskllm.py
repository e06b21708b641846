"""MaskLLM (Fang et al., NeurIPS 2024): learned N:M masks on frozen weights.

Every group of M consecutive input weights of a targeted Linear gets one logit per admissible
pattern (six for 2:4). Training draws a Gumbel-softmax mixture of the patterns, so the forward uses
W ⊙ soft_mask and the language-modelling loss reaches the logits; the temperature τ falls and the
logit scale κ rises linearly, so the mixture hardens into one pattern per group. Evaluation and export
use each group's argmax pattern, always a valid N:M mask. Logits start from a one-shot prior mask
(SparseGPT / Wanda / magnitude, without SparseGPT's weight update): patterns that share more kept
positions with the prior get higher logits.

The pure functions come first; `learn_masks` runs the training loop on accelerate, so the same code
runs on one device here or under `accelerate launch` on several GPUs."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from pydantic import Field, field_validator, model_validator
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import CompressionError, RecipeError
from ..faults import fault_point
from ..specs import PATTERN, Strict, check_data_source
from ..stage import Stage, order_rule, register, stage_kind

log = logging.getLogger(__name__)


class MaskLLMLearn(Strict):
    """Learn N:M masks end to end with the weights frozen (Fang et al., 2024)."""
    method: Literal["maskllm"]
    pattern: str = Field("2:4", description='"N:M" (N zeros in every M inputs); one logit per admissible pattern')
    prior: Literal["sparsegpt", "wanda", "magnitude", "none"] = Field(
        "sparsegpt", description="one-shot mask the logits start from (SparseGPT without its weight update)")
    prior_strength: float = Field(3.0, ge=0.0, description="logit bonus of the prior's pattern, in units of init_std")
    init_std: float = Field(0.01, gt=0.0, description="std of the random initial logits")
    steps: int = Field(100, ge=0, description="optimizer steps")
    batch_size: int = Field(1, gt=0, description="windows per micro-batch (per process)")
    accumulate: int = Field(1, gt=0, description="micro-batches per optimizer step")
    dataset: str | None = Field(None, description="training text; default: the calibration dataset")
    nsamples: int | None = Field(None, gt=0, description="training windows drawn (cycled); default: one per "
                                 "micro-batch entry, steps × batch_size × accumulate")
    seqlen: int | None = Field(None, gt=0, description="tokens per training window; default: the calibration seqlen")
    lr: float = Field(5e-4, gt=0.0, description="peak learning rate of the logits (cosine decay to min_lr)")
    min_lr: float = Field(5e-5, ge=0.0, description="learning rate at the last step (at most lr)")
    tau: tuple[float, float] = Field((4.0, 0.05), description="Gumbel-softmax temperature, first → last step")
    kappa: tuple[float, float] = Field((100.0, 500.0), description="logit scale, first → last step")
    weight_reg: float = Field(1e-5, ge=0.0, description="weight of −‖W ⊙ mask‖² (keeps kept weights large), "
                              "fading linearly to 0")
    grad_clip: float = Field(1.0, ge=0.0, description="max gradient norm of the logits (0: off)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="auto: bf16 autocast on CUDA, none on CPU")
    checkpoint_every: int = Field(50, ge=0, description="save the logits every N steps with --checkpoint-dir (0: never)")
    log_every: int = Field(10, gt=0, description="record loss, τ, κ and the share of changed patterns every N steps")
    targets: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names; default: every Linear in the decoder layers")
    ignore: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names to leave dense")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        m = PATTERN.match(v)
        if not m or not 0 < int(m[1]) < int(m[2]):
            raise ValueError('must be "N:M" with 0 < N < M, like "2:4"')
        if math.comb(int(m[2]), int(m[1])) > 256:
            raise ValueError("too many patterns per group (C(M, N) > 256); use 2:4 or 4:8")
        return v

    @field_validator("dataset")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        return v if v is None else check_data_source(v)

    @model_validator(mode="after")
    def _ranges(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} exceeds lr {self.lr}")
        if min(self.tau) <= 0 or min(self.kappa) <= 0:
            raise ValueError("tau and kappa must be positive")
        return self

    @property
    def nm(self) -> tuple[int, int]:
        n, m = self.pattern.split(":")
        return int(n), int(m)

MASK_FORMAT = "sparsellm-masks-v1"


# -- pure functions --------------------------------------------------------------------------------------

def mask_patterns(n: int, m: int) -> torch.Tensor:
    """(C(m, m-n), m) keep-masks (1 = kept) of every way to zero n of m weights, in lexicographic
    order of the kept positions: for 2:4 [1100, 1010, 1001, 0110, 0101, 0011]."""
    keep = m - n
    rows = [[1.0 if j in kept else 0.0 for j in range(m)] for kept in itertools.combinations(range(m), keep)]
    return torch.tensor(rows)


def prior_logits(groups: int, patterns: torch.Tensor, strength: float, init_std: float,
                 prior_keep: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial logits, (patterns, groups) float32: N(0, init_std) noise plus
    (overlap − (k − 1)) · init_std · strength, where overlap counts the kept positions a pattern shares
    with the prior's group and k is the number kept per group: the prior's own pattern gains
    strength·init_std, patterns one swap away nothing, the rest lose (as in the reference code).
    prior_keep: bool, `groups`·M entries, or None for no prior."""
    m = patterns.shape[1]
    logits = torch.randn(patterns.shape[0], groups, generator=generator) * init_std
    if prior_keep is not None and strength:
        k = patterns[0].sum()
        overlap = patterns @ prior_keep.reshape(-1, m).float().t()
        logits += (overlap - (k - 1)) * init_std * strength
    return logits


def gumbel_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def soft_mask(logits: torch.Tensor, patterns: torch.Tensor, tau: float, kappa: float, noise: torch.Tensor) -> torch.Tensor:
    """Gumbel-softmax mixture of the patterns, (groups, m): patternsᵀ · softmax((κ·logits + g) / τ).
    Logits are laid out (patterns, groups): a softmax over a short last dimension is several times
    slower on CPU."""
    probs = torch.softmax((logits * kappa + noise) / tau, dim=0)
    return (patterns.t() @ probs).t()


def hard_mask(logits: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Each group's most likely pattern, (groups, m) of 0/1: an exact N:M keep-mask."""
    return patterns[logits.argmax(dim=0)]


def linear_schedule(step: int, total: int, start: float, end: float) -> float:
    """start at step 0, end at the last step (total − 1), linear in between."""
    return start if total <= 1 else start + (end - start) * step / (total - 1)


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / max(total, 1)))


def noise_seed(seed: int, step: int, index: int) -> int:
    """A fixed seed per (run, micro-step, Linear): a recomputed forward (gradient checkpointing, a resumed
    run) draws the same noise."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()[:7], "little")


# -- masked Linear layers ---------------------------------------------------------------------------------

@dataclass
class MaskState:
    """What every masked Linear reads at forward time."""
    patterns: torch.Tensor
    seed: int
    tau: float = 1.0
    kappa: float = 1.0
    step: int = 0
    hard: bool = False
    reg: bool = False
    norms: dict = field(default_factory=dict)  # index → ‖W ⊙ mask‖² of the last forward


def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
    st: MaskState = self.maskllm_state
    logits = self.mask_logits
    patterns = st.patterns.to(logits.device)
    if st.hard:
        mask = hard_mask(logits, patterns)
    else:
        gen = torch.Generator(device=logits.device).manual_seed(noise_seed(st.seed, st.step, self.maskllm_index))
        mask = soft_mask(logits, patterns, st.tau, st.kappa, gumbel_noise(logits.shape, gen, logits.device))
    mask = mask.reshape(self.weight.shape)
    if st.reg:  # gradient to the mask only: keeps the kept weights large, never moves them
        st.norms[self.maskllm_index] = (self.weight.detach().float() * mask).pow(2).sum()
    return F.linear(x, self.weight * mask.to(self.weight.dtype), self.bias)


def attach(linears: dict[str, nn.Linear], logits: dict[str, torch.Tensor], state: MaskState) -> None:
    """Give each Linear fp32 mask logits (trainable) and the masked forward; its weight is frozen."""
    for index, (name, lin) in enumerate(linears.items()):
        lin.weight.requires_grad_(False)
        if lin.bias is not None:
            lin.bias.requires_grad_(False)
        lin.register_parameter("mask_logits", nn.Parameter(logits[name].to(lin.weight.device, torch.float32)))
        lin.maskllm_state, lin.maskllm_index = state, index
        lin.forward = types.MethodType(_masked_forward, lin)


@torch.no_grad()
def detach(linears: dict[str, nn.Linear], patterns: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bake each Linear's argmax mask into its weight and make it a plain Linear again; returns the
    keep-masks (bool, weight-shaped)."""
    keep = {}
    for name, lin in linears.items():
        mask = hard_mask(lin.mask_logits, patterns.to(lin.mask_logits.device)).reshape(lin.weight.shape).bool()
        lin.weight.masked_fill_(~mask.to(lin.weight.device), 0)
        keep[name] = mask.cpu()
        del lin.mask_logits, lin.maskllm_state, lin.maskllm_index, lin.forward
    return keep


# -- mask files (transfer to another checkpoint) -----------------------------------------------------------

def save_masks(keep: dict[str, torch.Tensor], path: Path, pattern: str, model_type: str) -> None:
    """The learned keep-masks alone, bit-packed as compressed-tensors' bitmask (1 bit a weight, a row
    per weight row, first column in the lowest bit), with their shapes in the metadata."""
    from ..formats import pack_bitmask

    tensors = {f"{name}.mask": pack_bitmask(m) for name, m in keep.items()}
    meta = {"format": MASK_FORMAT, "pattern": pattern, "model_type": model_type,
            "shapes": {name: list(m.shape) for name, m in keep.items()}}
    # one metadata key: safetensors writes several in a per-process random order (not bit-reproducible)
    save_file(tensors, str(path), metadata={"sparsellm": json.dumps(meta, sort_keys=True)})


def load_masks(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError

    from ..formats import unpack_bitmask

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("sparsellm", "{}"))
            if not isinstance(meta, dict) or meta.get("format") != MASK_FORMAT:
                raise RecipeError(f"{path} is not a sparsellm mask file; give the masks.safetensors a maskllm run wrote")
            keep = {name: unpack_bitmask(f.get_tensor(f"{name}.mask"), shape) for name, shape in meta["shapes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise RecipeError(f"cannot read the mask file {path}: {e}; give the masks.safetensors a maskllm run wrote") from None
    return keep, meta


@torch.no_grad()
def apply_masks(model: nn.Module, keep: dict[str, torch.Tensor]) -> int:
    """Zero the pruned weights of `model` (same architecture as the masks' model); returns how many."""
    modules = dict(model.named_modules())
    for name, mask in keep.items():
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise CompressionError(f"the masks name {name}, which this model does not have; apply them to a "
                                   "checkpoint of the same architecture")
        if tuple(lin.weight.shape) != tuple(mask.shape):
            raise CompressionError(f"{name}: mask shape {tuple(mask.shape)} differs from the weight's "
                                   f"{tuple(lin.weight.shape)}; apply them to a checkpoint of the same architecture and size")
    zeroed = 0
    for name, mask in keep.items():
        w = modules[name].weight
        w.masked_fill_(~mask.to(w.device), 0)
        zeroed += int((~mask).sum())
    return zeroed


# -- training ---------------------------------------------------------------------------------------------

def _prior(model, adapter, spec, linears, windows, select, device, batch) -> dict[str, torch.Tensor] | None:
    """Keep-masks of a one-shot N:M pass (the weights are restored afterwards: MaskLLM keeps them dense)."""
    if spec.prior == "none":
        return None
    from ..calibrate import run_layerwise
    from ..stage import spec_class
    from .masks import nm_mask
    from .prune import build_method

    prior = spec_class("prune", spec.prior)(method=spec.prior, pattern=spec.pattern, targets=spec.targets,
                                            ignore=spec.ignore)
    dense = {name: lin.weight.detach().clone() for name, lin in linears.items()}
    run_layerwise(model, adapter, windows, [build_method(prior)], select, device, batch, desc=f"prior {spec.prior} {spec.pattern}")
    n, m = spec.nm
    keep = {}
    with torch.no_grad():
        for name, lin in linears.items():
            # the pruned entries are the zeros; a weight that was already 0 may count either way, it changes nothing
            keep[name] = ~nm_mask((lin.weight != 0).float().cpu(), n, m)
            lin.weight.copy_(dense.pop(name))
    return keep


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
    return out


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def learn_masks(model, adapter, windows: torch.Tensor, train: torch.Tensor, spec, device, batch: int,
                seed: int, checkpoint=None, key: str = "learn") -> tuple[dict, dict[str, torch.Tensor]]:
    """Train N:M mask logits on `train` (token windows) with the weights frozen, then bake the argmax
    masks into the weights. `windows`: calibration windows for the prior. Returns (details, keep-masks)."""
    from accelerate import Accelerator

    from ..calibrate import make_selector
    from ..calibrate.engine import target_linears

    select = make_selector(spec.targets, spec.ignore)
    linears = {}
    for i, layer in enumerate(adapter.layers(model)):
        prefix = adapter.layer_prefix(i)
        linears.update({f"{prefix}.{n}": lin for n, lin in target_linears(layer, prefix, select).items()})
    n, m = spec.nm
    patterns = mask_patterns(n, m)
    for name, lin in linears.items():
        if lin.in_features % m:
            raise CompressionError(f"{name}: M={m} does not divide the input width {lin.in_features}")

    saved = checkpoint.result(key) if checkpoint is not None else None
    if saved is None:
        prior = _prior(model, adapter, spec, linears, windows, select, device, batch)
        gen = torch.Generator().manual_seed(seed)
        logits = {name: prior_logits(lin.weight.numel() // m, patterns, spec.prior_strength, spec.init_std,
                                     None if prior is None else prior[name], gen) for name, lin in linears.items()}
    else:
        tensors = checkpoint.load_tensors(key)
        logits = {name: tensors[f"logits.{name}"] for name in linears}

    cuda = torch.device(device).type == "cuda"
    precision = spec.mixed_precision if spec.mixed_precision != "auto" else ("bf16" if cuda else "no")
    acc = Accelerator(cpu=not cuda, mixed_precision=precision, gradient_accumulation_steps=spec.accumulate)
    state = MaskState(patterns, seed, reg=spec.weight_reg > 0)
    attach(linears, logits, state)
    params = [lin.mask_logits for lin in linears.values()]
    start_argmax = torch.cat([p.detach().argmax(0).to(torch.uint8).cpu() for p in params])
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    if spec.gradient_checkpointing:  # transformers 5 renamed it; 4.x has only the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    was_training = model.training
    model.train()
    model, opt = acc.prepare(model, opt)

    start, history = 0, []
    if saved is not None:
        start, history = saved["step"], saved["history"]
        start_argmax = tensors["start_argmax"]
        _load_opt(opt, tensors, saved["param_groups"])
        log.info("maskllm: resuming at step %d of %d from the checkpoint", start, spec.steps)

    per_step = spec.batch_size * spec.accumulate * acc.num_processes
    t0 = time.perf_counter()
    bar = tqdm(range(start, spec.steps), desc=f"maskllm {spec.pattern}", unit="step", initial=start, total=spec.steps,
               disable=not acc.is_local_main_process)
    for step in bar:
        state.tau = linear_schedule(step, spec.steps, *spec.tau)
        state.kappa = linear_schedule(step, spec.steps, *spec.kappa)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, spec.steps, spec.lr, spec.min_lr)
        lam = spec.weight_reg * (1 - step / spec.steps)  # the regulariser fades out, as in the paper
        lm_loss = 0.0
        for micro in range(spec.accumulate):
            first = step * per_step + (acc.process_index * spec.accumulate + micro) * spec.batch_size
            idx = torch.arange(first, first + spec.batch_size) % train.shape[0]
            ids = train[idx].to(acc.device)
            state.step = step * spec.accumulate + micro
            with acc.accumulate(model):
                out = model(input_ids=ids, labels=ids)
                loss = out.loss
                if state.reg:
                    loss = loss - lam * torch.stack(list(state.norms.values())).sum()
                acc.backward(loss)
                if acc.sync_gradients and spec.grad_clip:
                    acc.clip_grad_norm_(params, spec.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            lm_loss += float(acc.reduce(out.loss.detach(), "mean")) / spec.accumulate
            state.norms.clear()
        if not math.isfinite(lm_loss):
            from ..errors import NumericalError
            raise NumericalError(f"maskllm: the loss became {lm_loss} at step {step}; lower lr or use mixed_precision: no")
        done = step + 1
        if done % spec.log_every == 0 or done == spec.steps:
            now = torch.cat([p.detach().argmax(0).to(torch.uint8).cpu() for p in params])
            changed = float((now != start_argmax).float().mean())
            history.append({"step": done, "loss": lm_loss, "tau": state.tau, "kappa": state.kappa, "changed": changed})
            bar.set_postfix(loss=f"{lm_loss:.3f}", tau=f"{state.tau:.2f}", kappa=f"{state.kappa:.0f}", changed=f"{changed:.2%}")
        if checkpoint is not None and spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < spec.steps:
            tensors = {f"logits.{name}": lin.mask_logits.detach().cpu() for name, lin in linears.items()}
            tensors.update(_opt_tensors(opt), start_argmax=start_argmax)
            checkpoint.save_tensors(key, tensors, {"step": done, "history": history,
                                                   "param_groups": opt.state_dict()["param_groups"]})
        fault_point(f"learn:{done}")
    seconds = time.perf_counter() - t0
    bar.close()

    model = acc.unwrap_model(model)
    if spec.gradient_checkpointing:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    model.config.use_cache = use_cache
    model.train(was_training)
    keep = detach(linears, patterns)
    final = torch.cat([hard_mask_index(k, patterns) for k in keep.values()]) if keep else torch.empty(0)
    steps_run = spec.steps - start
    details = {"steps": spec.steps, "tokens": spec.steps * per_step * train.shape[1], "prior": spec.prior,
               "seconds": seconds, "seconds_per_step": seconds / steps_run if steps_run else None,
               "resumed_at_step": start or None, "changed_from_prior": float((final != start_argmax).float().mean()) if keep else 0.0,
               "history": history, "processes": acc.num_processes, "mixed_precision": precision}
    return details, keep


def hard_mask_index(keep: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Pattern index of each group of an N:M keep-mask (uint8)."""
    m = patterns.shape[1]
    match = keep.reshape(-1, m).float() @ patterns.t() == patterns.sum(1)
    return match.float().argmax(-1).to(torch.uint8)


@stage_kind
class LearnStage(Stage):
    family_refusal = "learn_refusal"
    kind = "learn"

    def check(self, ctx) -> None:
        from .prune import check_stage_fits

        ctx.adapter.check_learn()
        check_stage_fits(ctx.model, ctx.adapter, self.spec)

    def prepare(self, ctx) -> None:
        from ..calibrate import default_seqlen
        from ..data import calibration_windows

        s, i = self.spec, self.entry.index
        n = s.nsamples or s.steps * s.batch_size * s.accumulate or 1
        with ctx.timer(f"training data {i}"):
            self.train = calibration_windows(ctx.tokenizer, s.dataset or ctx.recipe.calibration.dataset, n,
                                             default_seqlen(ctx.model, s.seqlen or ctx.seqlen), ctx.seed, ctx.bos)

    def run(self, ctx) -> list[dict]:
        def work():
            details, keep = learn_masks(ctx.model, ctx.adapter, ctx.windows, self.train, self.spec, ctx.device,
                                        ctx.batch_size, ctx.seed, ctx.checkpoint, key=f"learn{self.entry.index}")
            model_type = ctx.model.config.model_type
            ctx.artifacts["masks.safetensors"] = lambda path: save_masks(keep, path, self.spec.pattern, model_type)
            return details

        return self.timed(ctx, work)


register("learn", MaskLLMLearn, learn_masks)


@order_rule("learn")
def _learn_first(i, stages):
    if any(prev.kind in ("prune", "refine", "learn") for prev in stages[:i]):
        return (f"stages.{i}: a learn stage needs the dense weights; put it before any prune stage "
                "(it computes its prior mask itself: prior: sparsegpt)")
    return None
