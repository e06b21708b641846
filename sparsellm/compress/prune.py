"""The prune stage: one pass of the layer walk in which its method and the refine stages right after it
compress each decoder layer (DSnoT needs the statistics of the same inputs the mask was chosen on, and
the dense weights); an allocate stage right before it sets each layer's sparsity first. The stage owns
those entries: it builds their methods itself, so no stage changes another's objects."""
from __future__ import annotations

import logging
import time

from .. import memory
from ..allocate import allocate
from ..calibrate import make_selector, run_layerwise
from ..calibrate.engine import layer_targets
from ..errors import RecipeError
from ..stage import Stage, implementation, order_rule, stage_kind

log = logging.getLogger(__name__)


def build_method(spec, layer_sparsity: list[float] | None = None, nm: tuple[int, int] | None = None):
    """The LayerwiseMethod of a prune or refine spec; a prune method gets the allocation's per-layer
    sparsities, a refine method the N:M pattern of the prune stage it refines."""
    kind = "prune" if hasattr(spec, "pattern") else "refine"
    method = implementation(kind, spec.method)(spec)
    if layer_sparsity is not None:
        method.layer_sparsity = layer_sparsity
    if kind == "refine":
        method.nm = nm
    return method


def check_stage_fits(model, adapter, spec) -> None:
    """Reject a stage that matches no layer or whose N:M group does not divide a layer's width."""
    select = make_selector(spec.targets, spec.ignore)
    found = 0
    for i, layer in enumerate(adapter.layers(model)):
        for name, lin in layer_targets(adapter, layer, adapter.layer_prefix(i), select).items():
            found += 1
            if spec.nm and lin.in_features % spec.nm[1]:
                raise RecipeError(f"pattern {spec.pattern}: M={spec.nm[1]} does not divide the input width "
                                  f"{lin.in_features} of {adapter.layer_prefix(i)}.{name}; use an M that divides "
                                  "every targeted layer's width (2:4, 4:8), or ignore that layer")
    if not found:
        raise RecipeError("stage targets/ignore match no Linear layer inside the decoder layers; check the globs "
                          "against module names such as model.layers.0.mlp.down_proj (an expert's: "
                          "model.layers.0.mlp.experts.0.down_proj)")


def refine_selector(adapter, spec, prune_select):
    """A refine stage works on what the prune stage pruned, narrowed to its `modules` and globs."""
    sel = make_selector(spec.targets, spec.ignore)

    def select(name: str) -> bool:
        if spec.modules != "all" and adapter.is_attention(name) != (spec.modules == "attention"):
            return False
        return prune_select(name) and sel(name)

    return select


def label(spec) -> str:
    if getattr(spec, "nm", None):
        return f"{spec.method} {spec.pattern}"
    return f"{spec.method} {spec.sparsity}" if getattr(spec, "sparsity", None) is not None else spec.method


@stage_kind
class PruneStage(Stage):
    kind = "prune"
    owns_before = ("allocate",)
    owns_after = ("refine",)

    @property
    def allocation(self):
        """The allocate entry right before this stage's, if any."""
        return next((e for e in self.entries if e.kind == "allocate"), None)

    @property
    def refines(self) -> list:
        """The refine entries right after this stage's, in order."""
        return [e for e in self.entries if e.kind == "refine"]

    def whole_model_reason(self, flag: str) -> str | None:
        return None  # the allocations (OWL, ECoFLaP) and the pass itself go through the layer walk

    def needs_data(self) -> bool:
        return self.allocation is not None or any(build_method(e.spec).needs for e in [self.entry, *self.refines])

    def check(self, ctx) -> None:
        check_stage_fits(ctx.model, ctx.adapter, self.spec)

    def _allocate(self, ctx, select) -> dict:
        key = f"allocation{self.allocation.index}"
        result = ctx.checkpoint.result(key) if ctx.checkpoint is not None else None
        if result is None:
            result = allocate(self.allocation.spec, self.spec, ctx.model, ctx.adapter, ctx.windows, select, ctx.device,
                              ctx.batch_size, ctx.seed, io=ctx.handle.reading(),
                              min_expert_tokens=ctx.recipe.calibration.min_expert_tokens)
            if ctx.checkpoint is not None:
                ctx.checkpoint.put_result(key, result)
        log.info("%s allocation: layer sparsity %.3f..%.3f, realized overall %.4f", self.allocation.spec.method,
                 min(result["sparsity"]), max(result["sparsity"]), result["realized"])
        return result

    def run(self, ctx) -> list[dict]:
        reports = []
        select = make_selector(self.spec.targets, self.spec.ignore)
        layer_sparsity = None
        if self.allocation is not None:
            t = time.perf_counter()
            result = self._allocate(ctx, select)
            ctx.results["allocation"] = result
            layer_sparsity = result["sparsity"]
            reports.append(self.report(self.allocation, time.perf_counter() - t))
            memory.reset_peak()
        t = time.perf_counter()
        group = [self.entry, *self.refines]
        methods = [build_method(self.spec, layer_sparsity)] + [build_method(e.spec, nm=self.spec.nm) for e in self.refines]
        selects = [select] + [refine_selector(ctx.adapter, e.spec, select) for e in self.refines]
        desc = " + ".join(label(e.spec) for e in group)
        experts: dict = {}  # mixture of experts: the tokens each expert saw, and which fell back to data-free scores
        own = run_layerwise(ctx.model, ctx.adapter, ctx.windows, methods, selects, ctx.device, ctx.batch_size, desc=desc,
                            checkpoint=ctx.checkpoint, pass_key=f"stage{self.entry.index}", io=ctx.handle.io(),
                            min_expert_tokens=ctx.recipe.calibration.min_expert_tokens, experts=experts)
        total = time.perf_counter() - t
        if experts:
            experts.setdefault("experts_data_free", [])
            experts["min_expert_tokens"] = ctx.recipe.calibration.min_expert_tokens
        for n, e in enumerate(group):
            # the shared calibration forwards are booked on the prune stage
            secs = total - sum(own[1:]) if n == 0 else own[n]
            reports.append(self.report(e, secs, compute_seconds=own[n], details=(experts or None) if n == 0 else None))
        return reports


@order_rule("allocate")
def _allocate_before_prune(i, stages):
    nxt = stages[i + 1] if i + 1 < len(stages) else None
    if nxt is None or nxt.kind != "prune":
        return f"stages.{i}: an allocate stage must be followed by a prune stage"
    a, p = stages[i].spec, nxt.spec
    if a.sparsity is not None and abs(a.sparsity - p.sparsity) > 1e-9:
        return f"stages.{i}: allocate sparsity {a.sparsity} differs from the prune stage's {p.sparsity}"
    if not a.min_sparsity <= p.sparsity <= (a.max_sparsity or 1.0):
        return f"stages.{i}: target sparsity {p.sparsity} is outside [min_sparsity, max_sparsity]"
    return None


@order_rule("refine")
def _refine_after_prune(i, stages):
    if i == 0 or stages[i - 1].kind not in ("prune", "refine"):
        return (f"stages.{i}: a refine stage must come right after a prune (or refine) stage, "
                "whose dense weights it needs")
    return None
