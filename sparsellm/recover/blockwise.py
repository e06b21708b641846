"""The reconstruct stage: after the masks are fixed (prune, refine, learn), train the kept weights of
one decoder block at a time so that the sparse model's block outputs match the dense model's.

The walk keeps two activation streams: the sparse model's hidden states, advanced through the
blocks as they are reconstructed (each block learns to correct what the blocks before it left
wrong), and, for `target: dense`, the dense model's own hidden states, advanced through the dense
blocks; the dense block's output on its own inputs is the target (EBFT, Guo et al. 2024). With
`target: same-input` the target is the dense block applied to the sparse inputs (a local fit, like
SparseGPT's layer-wise objective one level up). `parts: attention-mlp` fits the attention half and the
MLP half of each block one after the other (the free-lunch granularity, Wagner et al. 2025), each
with its pre-norm: the attention half learns h + attn(norm1(h)) toward the dense residual stream after
attention, then the MLP half continues from the reconstructed attention half.

Where the dense weights come from: in memory, a copy of the decoder layers' tensors taken when the run
begins (before any stage; it costs one copy of the decoder layers in memory for the whole run); in
low-memory mode each dense layer is read again from the source checkpoint's shards; a model offloaded
by accelerate (--device-map) has each dense layer written once to a scratch safetensors file (in the
offload folder when it offloads to disk) before any stage, and read back one layer at a time.

Masks are the zeros of each Linear weight when the stage starts: they get no gradient and are zeroed
again after every step (recover.reconstruct.reconstruct_block), so masks, N:M patterns and sparsity
stay exact. Fixed batch order and no sampling: reruns at a fixed thread count are bit-identical.
With --checkpoint-dir every finished block (and both streams) is saved; a resumed run continues
with the next block."""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..calibrate.walk import capture, check_finite, layer_forward, walk_layers
from ..errors import RecipeError
from ..faults import fault_point
from ..specs import Strict
from ..stage import Stage, order_rule, register, stage_kind
from .reconstruct import ReconstructResult, part_inputs, reconstruct_block

log = logging.getLogger(__name__)


class BlockwiseReconstruct(Strict):
    """Train the kept weights (and norm scales) block by block toward the dense model's outputs, masks frozen."""
    method: Literal["blockwise"]
    target: Literal["dense", "same-input"] = Field(
        "dense", description="dense: the dense model's block outputs on its own inputs (errors of earlier blocks "
        "are corrected too); same-input: the dense block applied to the sparse model's inputs")
    parts: Literal["block", "attention-mlp"] = Field(
        "block", description="block: the whole decoder block at once; attention-mlp: the attention half, then the "
        "MLP half, each with its norm (pre-norm blocks only)")
    epochs: int = Field(2, ge=0, description="passes over the training windows per block (or half-block)")
    lr: float = Field(5e-3, gt=0.0, description="Adam learning rate (constant); with lr_scale rms (the default), "
                      "relative to each tensor's size")
    lr_scale: Literal["rms", "none"] = Field(
        "rms", description="rms: each tensor's learning rate is lr times the root mean square of its kept entries, "
        "so a step moves every tensor by the same fraction on models whose weights are larger or smaller; none: "
        "lr for every tensor")
    batch_size: int = Field(1, gt=0, description="calibration windows per Adam step")
    holdout: float = Field(0.125, ge=0.0, lt=1.0, description="share of the calibration windows held back (the last ones, "
                           "rounded down to whole batches): after every epoch their error picks the parameters kept, the "
                           "starting ones included; none held back: the training error decides")
    patience: int = Field(2, ge=1, description="stop a block after this many epochs without a new lowest error")
    norms: bool = Field(True, description="train the norm scales (and shifts) too, besides the kept Linear weights")
    grad_clip: float | None = Field(1.0, gt=0.0, description="gradient norm clip per step (null: none)")


def held_batches(spec, windows: int) -> int:
    """Batches held back: the share `holdout` of the windows, rounded down to whole batches."""
    return int(spec.holdout * windows) // spec.batch_size


# ---- the dense reference -------------------------------------------------------------------------

class DenseLayers:
    """The decoder layers' weights as loaded, before any stage: a copy in memory, or (streamed model)
    re-read from the source checkpoint's shards."""

    def __init__(self, handle, adapter):
        self.adapter, self.saved, self.stream, self.scratch = adapter, None, None, None
        if handle.kind == "stream":
            from ..lowmem.tensors import TensorSource

            self.stream = handle.stream
            self.source = TensorSource(handle.source.path, handle.source.spec)  # not redirected to the output
        elif handle.kind == "offload":
            self._write_scratch(handle)
        else:
            self.saved = [{k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()}
                          for layer in adapter.layers(handle.model)]

    def _write_scratch(self, handle) -> None:
        """Each decoder layer of an offloaded model, brought in once and written to its own file."""
        from safetensors.torch import save_file

        from ..lowmem.offload import offload_folder

        self.scratch = tempfile.TemporaryDirectory(prefix="sparsellm-dense-", dir=offload_folder(handle.model))
        reading = handle.reading()
        for index, layer in enumerate(self.adapter.layers(handle.model)):
            reading.load(index, layer)
            try:
                save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in layer.state_dict().items()},
                          self._file(index))
            finally:
                reading.release(index, layer)
        log.info("dense decoder layers written to %s for the reconstruction (%.0f MiB)", self.scratch.name,
                 sum(f.stat().st_size for f in Path(self.scratch.name).iterdir()) / 2**20)

    def _file(self, index: int) -> str:
        return str(Path(self.scratch.name) / f"layer-{index:05d}.safetensors")

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None

    def nbytes(self) -> int:
        """Bytes of the copy held in memory (none when streamed or offloaded)."""
        return 0 if self.saved is None else sum(t.numel() * t.element_size() for s in self.saved for t in s.values())

    @torch.no_grad()
    def layer(self, index: int, like: nn.Module) -> nn.Module:
        """A copy of `like` (decoder layer `index`, loaded) carrying the dense weights."""
        from ..lowmem.offload import unhooked_copy

        dense = unhooked_copy(like)
        if self.saved is not None:
            dense.load_state_dict(self.saved[index])
        elif self.scratch is not None:
            from safetensors.torch import load_file

            dense.load_state_dict(load_file(self._file(index), device=str(next(like.parameters()).device)))
        else:
            prefix = self.adapter.layer_prefix(index)
            aliases = self.stream.skeleton.aliases
            names = {n: aliases[f"{prefix}.{n}"] for n, _ in dense.named_parameters(remove_duplicate=False)}
            read = self.stream.read(sorted(set(names.values())), self.source)
            for n, p in dense.named_parameters(remove_duplicate=False):
                p.copy_(read[names[n]].to(p.dtype))
        dense.requires_grad_(False)
        return dense.eval()


# ---- one block ------------------------------------------------------------------------------------

def zero_masks(block: nn.Module) -> dict[str, torch.Tensor]:
    """Linear name -> bool mask of its zero weights (what reconstruction keeps at zero)."""
    return {n: m.weight.detach() == 0 for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and bool((m.weight == 0).any())}


class _Half(nn.Module):
    """The residual branch of one half of a pre-norm block: modules applied in order to h, the first
    (the attention) with the keyword arguments the block passes to it."""

    def __init__(self, block: nn.Module, norm: str, calls: tuple[str, ...]):
        super().__init__()
        self.names = ((norm,) if norm else ()) + calls
        self.mods = nn.ModuleDict({n.replace(".", "__"): block.get_submodule(n) for n in self.names})
        self.first_call = calls[0]

    def forward(self, h: torch.Tensor, **kwargs) -> torch.Tensor:
        for n in self.names:
            out = self.mods[n.replace(".", "__")](h, **(kwargs if n == self.first_call else {}))
            h = out[0] if isinstance(out, tuple) else out
        return h


def halves(block: nn.Module, adapter) -> list[_Half]:
    """The attention half and the MLP half of a pre-norm block (h + attn(norm1(h)), then the same with the MLP)."""
    return [_Half(block, adapter.norms[0], (adapter.attention,)), _Half(block, adapter.norms[1], adapter.mlp_call)]


def _half_masks(half: _Half, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for n in half.names:
        key = n.replace(".", "__")
        for m, mask in masks.items():
            if m.startswith(n + "."):
                out[f"mods.{key}.{m[len(n) + 1:]}"] = mask
            elif m == n:
                out[f"mods.{key}"] = mask
    return out


@torch.no_grad()
def _attention_kwargs(block: nn.Module, attention: str, hidden: list, kwargs: list) -> list[dict]:
    return part_inputs(block, attention, hidden, kwargs)[1]


def _train(module, masks, hidden, kwargs, targets, spec) -> ReconstructResult:
    return reconstruct_block(module, masks, hidden, kwargs, targets, epochs=spec.epochs, lr=spec.lr,
                             holdout=held_batches(spec, spec.batch_size * len(hidden)), patience=spec.patience,
                             norms=spec.norms, grad_clip=spec.grad_clip, lr_scale=spec.lr_scale)


def _result(r: ReconstructResult) -> dict:
    return {"heldout_before": r.heldout_before, "heldout_after": r.heldout_after, "train_before": r.train_before,
            "train_after": r.train_after, "epochs": r.epochs, "best_epoch": r.best_epoch, "steps": r.steps}


def reconstruct_layer(block: nn.Module, dense: nn.Module, adapter, hidden: list, kwargs: list,
                      dense_hidden: list | None, spec) -> tuple[dict, list | None]:
    """Reconstruct one decoder block in place; returns its report entry and the dense stream's next
    inputs (None for target same-input)."""
    masks = zero_masks(block)
    with torch.no_grad():
        dense_out = [layer_forward(dense, h, k) for h, k in zip(dense_hidden if dense_hidden is not None else hidden, kwargs)]
    if spec.parts == "block":
        r = _train(block, masks, hidden, kwargs, dense_out, spec)
        return {"block": _result(r)}, (dense_out if dense_hidden is not None else None)
    # two halves: residual targets, h_next = h + branch(h)
    akw = _attention_kwargs(block, adapter.attention, hidden, kwargs)
    sparse_h, dense_h = halves(block, adapter), halves(dense, adapter)
    report, h, d = {}, hidden, dense_hidden
    for name, half, dhalf in zip(("attention", "mlp"), sparse_h, dense_h):
        kw = akw if name == "attention" else [{} for _ in h]
        with torch.no_grad():
            if d is not None:  # toward the dense residual stream: d + dbranch(d) - h
                d_next = [x + dhalf(x, **k) for x, k in zip(d, kw)] if name == "attention" else dense_out
                targets = [dn - x for dn, x in zip(d_next, h)]
            else:
                targets = [dhalf(x, **k) for x, k in zip(h, kw)]
        report[name] = _result(_train(half, _half_masks(half, masks), h, kw, targets, spec))
        with torch.no_grad():
            h = [x + half(x, **k) for x, k in zip(h, kw)]
        if d is not None:
            d = d_next
    return report, d


def check_halves(block: nn.Module, adapter, hidden: torch.Tensor, kwargs: dict) -> None:
    """Refuse a block that is not h + attn(norm1(h)), then + mlp(norm2(.)) (the halves must reproduce it)."""
    akw = _attention_kwargs(block, adapter.attention, [hidden], [kwargs])[0]
    a, m = halves(block, adapter)
    with torch.no_grad():
        mid = hidden + a(hidden, **akw)
        out = mid + m(mid)
        ref = layer_forward(block, hidden, kwargs)
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max().clamp_min(1))):
        raise RecipeError("reconstruct parts: attention-mlp needs pre-norm blocks (h + attn(norm1(h)), then "
                          "+ mlp(norm2(.))), which this model's are not; use parts: block")


# ---- the stage ------------------------------------------------------------------------------------

class _Log:
    """The per-block report entries, carried through the checkpoint as a pass's method state."""

    def __init__(self):
        self.blocks: list[dict] = []

    def state(self) -> dict:
        return {"blocks": self.blocks}

    def load_state(self, state: dict) -> None:
        self.blocks = list(state["blocks"])


def reconstruct(ctx, spec, dense: DenseLayers, pass_key: str) -> dict:
    """The stage's walk over the decoder layers (see the module docstring); returns the report details."""
    model, adapter, device = ctx.model, ctx.adapter, ctx.device
    layers = adapter.layers(model)
    book = _Log()
    ck = ctx.checkpoint
    io = ctx.handle.io()
    start = ck.restore(pass_key, layers, [book], io) if ck is not None else 0
    two = spec.target == "dense"
    if start < len(layers):
        acts = capture(model, adapter, ctx.windows, device, spec.batch_size)
        dense_hidden = [h.clone() for h in acts.hidden] if two else None
        if start:
            saved = ck.inputs(pass_key, start, device)
            n = len(acts.hidden)
            acts.hidden, acts.index = saved[:n], start
            if two:
                dense_hidden = saved[n:]
        for index, layer in walk_layers(model, adapter, device, io, f"reconstruct ({spec.parts})", start):
            t = time.perf_counter()
            dense_layer = dense.layer(index, layer)
            if spec.parts == "attention-mlp" and index == start:
                check_halves(layer, adapter, acts.hidden[0], acts.kwargs[0])
            entry, dense_hidden = reconstruct_layer(layer, dense_layer, adapter, acts.hidden, acts.kwargs,
                                                    dense_hidden, spec)
            del dense_layer
            seconds = time.perf_counter() - t  # logged, not reported: a resumed run's report equals an uninterrupted one's
            book.blocks.append({"layer": index, **entry})
            last = index + 1 == len(layers)
            if not last:
                acts.advance(layer)
                if two:
                    check_finite(dense_hidden, f"leaving dense decoder layer {index}", layer)
            log.info("reconstruct layer %d: held-back mse %s in %.1f s", index,
                     ", ".join(f"{p['heldout_before']:.4g} -> {p['heldout_after']:.4g}" for p in entry.values()), seconds)
            fault_point(f"reconstruct:{index}")
            if ck is not None:
                inputs = None if last else acts.hidden + (dense_hidden if two else [])
                ck.save_layer(pass_key, index, layer, inputs, [book])
        del acts
    return {"blocks": book.blocks, "dense_copy_bytes": dense.nbytes()}


@stage_kind
class ReconstructStage(Stage):
    kind = "reconstruct"

    def whole_model_reason(self, flag: str) -> str | None:
        return None  # streamed: the dense layers are read again from the shards; offloaded: from scratch files

    def check(self, ctx) -> None:
        if self.spec.parts == "attention-mlp":
            a = ctx.adapter
            if a.post_norms or not all(a.norms) or a.layers(ctx.model)[0].get_submodule(a.attention) is None:
                raise RecipeError("reconstruct parts: attention-mlp needs pre-norm blocks without post-norms; "
                                  "use parts: block for this model")

    def prepare(self, ctx) -> None:
        s, n = self.spec, int(ctx.windows.shape[0])
        if n % s.batch_size or n < s.batch_size:
            raise RecipeError(f"reconstruct: batch_size {s.batch_size} does not divide the {n} calibration windows; "
                              "use a batch_size that divides calibration.nsamples")
        with ctx.timer(f"dense copy {self.entry.index}"):
            self.dense = DenseLayers(ctx.handle, ctx.adapter)  # before any stage changes the weights

    def run(self, ctx) -> list[dict]:
        try:
            return self.timed(ctx, lambda: reconstruct(ctx, self.spec, self.dense, f"stage{self.entry.index}"))
        finally:
            self.dense.close()


register("reconstruct", BlockwiseReconstruct, reconstruct)


@order_rule("reconstruct")
def _reconstruct_after_masks(i, stages):
    kinds = [st.kind for st in stages[:i]]
    if not any(k in ("prune", "learn") for k in kinds):
        return (f"stages.{i}: a reconstruct stage trains the kept weights of a pruned model: put a prune (or learn) "
                "stage before it")
    if any(k in ("slice", "structure") for k in kinds):
        return (f"stages.{i}: a reconstruct stage matches the dense model's blocks, whose shapes slice and structure "
                "change; reconstruct without them")
    return None
