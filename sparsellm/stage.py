"""The one interface of the recipe's stages, their registry, and the run context they work on.

A recipe is a list of entries, one stage kind each (slice, learn, structure, recover, allocate,
prune, refine, reconstruct). Every method registers its recipe spec (a pydantic model whose `method` literal names
it) and its implementation under its kind, next to its code; the recipe schema and the CLI choices
are built from this registry. A kind with a `Stage` class runs on its own; the kinds `allocate` and
`refine` are owned by the prune stage next to them (it runs them in its own pass).

Adding a method: a spec class and an implementation in one module, `register(kind, Spec, impl)` at its
end, and the module in BUILTIN. Adding a stage kind: a `Stage` subclass with `@stage_kind`."""
from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from . import memory
from .errors import UnsupportedArchitectureError

# the recipe's stage keys in the schema's order
KINDS = ("slice", "learn", "structure", "recover", "allocate", "prune", "refine", "reconstruct")
# what an entry of each kind does, for the recipe reference (docs/recipes.md)
KIND_HELP = {
    "slice": "make the hidden dimension smaller (a smaller dense model)",
    "learn": "learn N:M masks by training (the weights stay frozen)",
    "structure": "remove whole FFN channels and attention heads (a smaller dense model)",
    "recover": "fine-tune after structure or slice, merged into the weights",
    "allocate": "per-layer sparsities for the prune entry right after it (same overall target)",
    "prune": "set weights to zero, unstructured or N:M",
    "refine": "change the mask of the prune entry right before it, same sparsity",
    "reconstruct": "train the kept weights block by block toward the dense model's outputs, masks frozen",
}
# modules whose import registers the built-in methods and stage kinds
# (in this order: the schema and the CLI list a kind's methods by their module's place here, whatever
# order the imports happen to run in)
BUILTIN = ("sparsellm.compress.prune", "sparsellm.compress.magnitude", "sparsellm.compress.wanda",
           "sparsellm.compress.sparsegpt", "sparsellm.compress.dsnot", "sparsellm.allocate.owl",
           "sparsellm.allocate.ecoflap", "sparsellm.compress.slicegpt", "sparsellm.compress.cfsp",
           "sparsellm.compress.structured", "sparsellm.recover.lora", "sparsellm.compress.maskllm",
           "sparsellm.recover.blockwise")

_methods: dict[str, dict[str, tuple[type, Any]]] = {k: {} for k in KINDS}
_kinds: dict[str, type["Stage"]] = {}
_loaded = False
version = 0  # bumped by every registration: the recipe schema is rebuilt when it changes


def register(kind: str, spec: type, impl: Any) -> None:
    """Make `spec` (its `method` literal names it) a recipe option of stage kind `kind`, run by `impl`."""
    global version
    if kind not in _methods:
        raise ValueError(f"unknown stage kind {kind!r}; one of {', '.join(KINDS)}")
    name = spec.model_fields["method"].annotation.__args__[0]
    _methods[kind][name] = (spec, impl)
    place = {m: i for i, m in enumerate(BUILTIN)}
    # built-in methods in BUILTIN's order (stable within a module), others after them as registered
    ordered = sorted(_methods[kind].items(), key=lambda kv: place.get(kv[1][0].__module__, len(BUILTIN)))
    _methods[kind] = dict(ordered)
    version += 1


def stage_kind(cls: type["Stage"]) -> type["Stage"]:
    """Class decorator: `cls` runs the recipe entries of kind `cls.kind`."""
    global version
    _kinds[cls.kind] = cls
    version += 1
    return cls


_rules: list[tuple[str, Callable]] = []


def order_rule(kind: str):
    """Decorator: `fn(index, stages) -> str | None` says what is wrong with the place of an entry of `kind`
    among the recipe's validated entries (each has .kind and .spec)."""
    def add(fn):
        global version
        _rules.append((kind, fn))
        version += 1
        return fn

    return add


def order_problem(stages: list) -> str | None:
    """The first problem of the entries' order (in recipe order), or None."""
    load_builtin()
    for i, st in enumerate(stages):
        for kind, rule in _rules:
            if st.kind == kind and (problem := rule(i, stages)):
                return problem
    return None


def load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def specs(kind: str) -> list[type]:
    load_builtin()
    return [spec for spec, _ in _methods[kind].values()]


def methods(kind: str) -> list[str]:
    load_builtin()
    return list(_methods[kind])


def implementation(kind: str, method: str):
    load_builtin()
    return _methods[kind][method][1]


def spec_class(kind: str, method: str) -> type:
    load_builtin()
    return _methods[kind][method][0]


def kind_class(kind: str) -> type["Stage"] | None:
    load_builtin()
    return _kinds.get(kind)


@dataclass
class RunContext:
    """What every stage runs on: the model (a handle of one of the three memory modes), its adapter and
    tokenizer, the calibration windows, device, seed, the checkpoint of a resumable run; stages leave
    results for the report and for later stages in `results`, and files for the output in `artifacts`."""

    handle: Any  # pipeline's ModelHandle
    adapter: Any
    tokenizer: Any
    recipe: Any
    device: Any
    windows: Any = None  # calibration token windows (None: the recipe needs no data)
    seqlen: int | None = None
    checkpoint: Any = None
    timer: Any = None
    results: dict = field(default_factory=dict)  # e.g. "allocation", "block_weight"
    artifacts: dict = field(default_factory=dict)  # output file name -> writer(path)

    @property
    def model(self):
        return self.handle.model

    @property
    def batch_size(self) -> int:
        return self.recipe.calibration.batch_size

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def bos(self) -> int | None:
        """The token every calibration window and evaluation chunk starts with, for models that always run
        after it (Gemma: `Adapter.needs_bos`); None for the others."""
        return self.tokenizer.bos_token_id if self.adapter.needs_bos else None


@dataclass
class Entry:
    """One recipe entry: its index in the list, kind and spec."""

    index: int
    kind: str
    spec: Any


class Stage(ABC):
    """A step of the recipe. A stage that works one decoder layer at a time through the layer walk runs
    in every memory mode; one that needs the whole model says so in `whole_model_reason`."""

    kind: ClassVar[str]
    # kinds of the entries right before / after its own that this stage runs itself
    owns_before: ClassVar[tuple[str, ...]] = ()
    owns_after: ClassVar[tuple[str, ...]] = ()

    def __init__(self, entries: list[Entry]):
        self.entries = entries  # its own entry first, then the ones it owns, in recipe order
        self.entry = entries[0]
        self.spec = self.entry.spec

    @classmethod
    def order_problem(cls, index: int, kinds: list[str], stages: list) -> str | None:
        """What is wrong with this entry's place among the recipe's `stages`, or None."""
        return None

    def whole_model_reason(self, flag: str) -> str | None:
        """Why this stage cannot run on a model held one layer at a time (streamed by --low-memory or
        offloaded by --device-map, named by `flag`), with what to do instead; None when it can."""
        return f"{self.spec.method} changes or trains the whole model at once; run it without {flag}"

    def needs_data(self) -> bool:
        return True

    # the adapter field holding this stage kind's one-line refusal for a whole family ("" for none)
    family_refusal: ClassVar[str] = ""

    def check_family(self, adapter) -> None:
        """Refuse a family this stage can never handle, from the adapter alone: run on the model type that
        config.json (or the GGUF header) names, before any weight is read."""
        reason = getattr(adapter, self.family_refusal, "") if self.family_refusal else ""
        if reason:
            raise UnsupportedArchitectureError(reason)

    def check(self, ctx: RunContext) -> None:
        """Refuse, before any heavy work, a model this stage cannot handle (shapes, architecture)."""

    def prepare(self, ctx: RunContext) -> None:
        """Read the stage's own data (e.g. training windows), after the calibration windows."""

    @abstractmethod
    def run(self, ctx: RunContext) -> list[dict]:
        """Run on ctx; one report entry per owned recipe entry (see `report`)."""

    def report(self, entry: Entry, seconds: float, compute_seconds: float | None = None,
               details: dict | None = None) -> dict:
        return {"kind": entry.kind, "method": entry.spec.method,
                "settings": entry.spec.model_dump(mode="json", by_alias=True), "seconds": seconds,
                "compute_seconds": compute_seconds, "peak_rss_bytes": memory.peak_rss_bytes(),
                "peak_cuda_bytes": memory.peak_cuda_bytes(), "details": details}

    def timed(self, ctx: RunContext, work) -> list[dict]:
        """The report of a stage that owns nothing: `work()` returns its details."""
        t = time.perf_counter()
        details = work()
        return [self.report(self.entry, time.perf_counter() - t, details=details)]


def build_stages(recipe) -> list[Stage]:
    """The recipe's entries grouped into stages: an entry of an owned kind joins the stage beside it."""
    entries = [Entry(i, st.kind, st.spec) for i, st in enumerate(recipe.stages)]
    stages: list[Stage] = []
    pending: list[Entry] = []  # owned entries that come before their owner (allocate before prune)
    for e in entries:
        cls = kind_class(e.kind)
        if cls is None:
            last = max(x.index for x in stages[-1].entries) if stages else None
            if last == e.index - 1 and e.kind in type(stages[-1]).owns_after:
                stages[-1].entries.append(e)
            else:
                pending.append(e)
            continue
        if any(p.kind not in cls.owns_before for p in pending):
            break
        stage = cls([e] + pending)
        pending = []
        stages.append(stage)
    if pending:  # the recipe validator puts every owned entry next to its owner
        raise ValueError(f"stages.{pending[0].index}: a {pending[0].kind} stage has no stage to belong to")
    return stages
