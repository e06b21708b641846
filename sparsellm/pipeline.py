"""load → calibrate → compress → export → report, for one recipe, in any memory mode.

`run_recipe` reads top to bottom: open the model (a handle: whole in memory, offloaded by accelerate,
or streamed from its shards), check every stage against it, draw the calibration windows, measure
before, run the stages on one run context, measure after, write the output folder atomically."""
from __future__ import annotations

import logging
import os
import platform
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, measure, memory
from .calibrate import default_seqlen
from .checkpoint import Checkpoint, check_folder, fingerprint
from .data import calibration_windows, evaluation_chunks
from .errors import RecipeError
from .evaluate import write_report
from .evaluate.schema import SCHEMA_VERSION
from .evaluate.speed import compare_speed
from .evaluate.zeroshot import check_chat_template, evaluate_tasks, mean_accuracy, task_manager
from .export import atomic_folder, check_output, disk_bytes
from .faults import fault_point
from .handle import ModelHandle, OffloadedHandle, StreamedHandle
from .loading import get_adapter, load_model
from .loading.adapters import SUPPORTED_MODEL_TYPES
from .loading.models import peek_model_type, source_info
from .lowmem import low_memory_reason, recipe_problem
from .lowmem.offload import is_dispatched, parse_device_map
from .stage import RunContext, Stage, build_stages

log = logging.getLogger(__name__)

__all__ = ["RunOptions", "run_recipe", "compress", "resolve_device", "default_seqlen", "run_stages"]


@dataclass
class RunOptions:
    device: str = "cpu"
    dtype: str = "auto"
    trust_remote_code: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    checkpoint_dir: str | None = None  # save progress per decoder layer here
    resume: bool = False  # continue from the checkpoint in checkpoint_dir
    low_memory: bool | None = None  # read/write the model layer by layer; None: when it exceeds the free memory
    device_map: str | None = None  # accelerate dispatch: "auto" or JSON {module: device}, "disk" offloads
    offload_folder: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RecipeError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
    return dev


class Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - t


def versions(lm_eval: bool = False) -> dict:
    import transformers

    v = {"sparsellm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "python": platform.python_version()}
    if lm_eval:
        import importlib.metadata

        v["lm_eval"] = importlib.metadata.version("lm_eval")
    return v


# ---- opening the model -------------------------------------------------------------------------

def open_model(spec: str | None, recipe, options: RunOptions) -> ModelHandle:
    """The model in the memory mode the options and its size call for (see lowmem.low_memory_reason)."""
    reason = low_memory_reason(spec, recipe, options)
    if reason:
        from .lowmem.stream import open_stream

        source, stream, tokenizer = open_stream(spec, options.dtype, options.trust_remote_code)
        handle = StreamedHandle(stream, tokenizer, source, reason)
        log.info("low-memory mode, %s: %.2f GiB of safetensors read one decoder layer at a time", reason,
                 handle.size / 2**30)
        return handle
    device_map = parse_device_map(options.device_map, options.offload_folder)
    if device_map is not None and (problem := recipe_problem(recipe, options, "--device-map")):
        raise RecipeError(f"--device-map: {problem}")
    loaded = load_model(spec, options.dtype, options.trust_remote_code, options.allow_pickle, device_map,
                        options.offload_folder)
    cls = OffloadedHandle if is_dispatched(loaded.model) else ModelHandle
    return cls(loaded.model, loaded.tokenizer, get_adapter(loaded.model), loaded.source, loaded)


# ---- measuring ---------------------------------------------------------------------------------

def evaluate_all(ctx: RunContext, seqlen: int, label: str, counts: dict | None = None) -> dict[str, float]:
    """Perplexity on each evaluation source; `counts` receives the number of chunks of each."""
    ev = ctx.recipe.evaluation
    out = {}
    for source in ev.ppl:
        chunks = evaluation_chunks(ctx.tokenizer, source, seqlen, ev.limit, ctx.bos)
        out[source] = ctx.handle.perplexity(chunks, ev.batch_size, ctx.device, f"ppl {label} {Path(source).name}")
        if counts is not None:
            counts[source] = int(chunks.shape[0])
        log.info("perplexity %s on %s: %.3f", label, source, out[source])
    return out


def evaluate_tasks_of(ctx: RunContext, label: str) -> dict:
    ev = ctx.recipe.evaluation
    log.info("lm-eval %s: %s", label, ", ".join(ev.tasks))
    res = evaluate_tasks(ctx.model, ctx.tokenizer, ev.tasks, ev.task_paths, ev.task_limit, ev.num_fewshot,
                         ev.task_batch_size, ctx.seed, apply_chat_template=ev.apply_chat_template)
    for task, r in res.items():
        log.info("%s %s: acc %s", label, task, r.get("acc"))
    return res


def on_device(ctx: RunContext, work):
    """`work()` with the whole model on the compute device (accelerate's hooks place an offloaded one)."""
    ctx.handle.to_device(ctx.device)
    try:
        return work()
    finally:
        ctx.handle.to_home()


def remembered(ctx: RunContext, key: str, work):
    """`work()`, or its result saved in the checkpoint by an interrupted run."""
    found = ctx.checkpoint.result(key) if ctx.checkpoint is not None else None
    if found is None:
        found = work()
        if ctx.checkpoint is not None:
            ctx.checkpoint.put_result(key, found)
    return found


def measure_speed_against_dense(ctx: RunContext, options: RunOptions, spec) -> dict:
    """Reload the dense model and time it against the compressed one, interleaved on the same device.
    Reloading (rather than a deep copy kept through compression) holds two models only for the
    measurement, not during calibration, whose activations are the other big consumer of memory."""
    dense = load_model(ctx.handle.source.spec, options.dtype, options.trust_remote_code, options.allow_pickle).model
    model, device = ctx.model, ctx.device
    try:
        dense.to(device)
        model.to(device)
        res = compare_speed({"dense": dense, "compressed": model}, device, **spec.model_dump())
    finally:
        del dense
        model.to("cpu")
    log.info("speed (tokens/s, dense -> compressed): prefill %.0f -> %.0f, decode %.1f -> %.1f",
             res["dense"]["prefill_tokens_per_s"], res["compressed"]["prefill_tokens_per_s"],
             res["dense"]["decode_tokens_per_s"], res["compressed"]["decode_tokens_per_s"])
    return {"interleaved": True, **res}


# ---- the stages --------------------------------------------------------------------------------

def check_families(stages: list[Stage], spec: str | None) -> None:
    """Refuse a stage the model's whole family cannot take (SliceGPT on Gemma, structured pruning of
    experts, ...) from the model type config.json or the GGUF header names, before any weight is read."""
    model_type = peek_model_type(spec)
    if model_type is None or model_type not in SUPPORTED_MODEL_TYPES:
        return  # unknown here, or an unsupported architecture: the load refuses it in one line
    adapter = get_adapter(model_type)
    for stage in stages:
        stage.check_family(adapter)


def check_stages(stages: list[Stage], ctx: RunContext) -> None:
    """Every stage checks itself against the model before any heavy work."""
    for stage in stages:
        stage.check(ctx)


def run_stages(stages: list[Stage], ctx: RunContext) -> list[dict]:
    """Run the stages in order on `ctx`; their report entries, one per recipe entry."""
    reports = []
    for stage in stages:
        memory.reset_peak()
        reports += stage.run(ctx)
    return reports


def calibration(ctx: RunContext, stages: list[Stage], timer: Timer):
    """The calibration windows (None when no stage needs data, e.g. magnitude)."""
    if not any(s.needs_data() for s in stages):
        return None
    cal = ctx.recipe.calibration
    with timer("calibration data"):
        return calibration_windows(ctx.tokenizer, cal.dataset, cal.nsamples, ctx.seqlen, ctx.seed, ctx.bos)


# ---- the report and the extra files ------------------------------------------------------------

def build_report(ctx: RunContext, *, eval_seqlen: int, stage_reports: list[dict], before: dict, after: dict,
                 load_memory: tuple[int, int], params_before: int, nonzero_before: int | None) -> dict:
    """report.json (schema in evaluate/schema.py); nonzero counts are None where the weights were never
    all in memory (low-memory and offloaded runs). `before`/`after`: perplexity, tasks, speed, chunks."""
    recipe, model, windows, timer = ctx.recipe, ctx.model, ctx.windows, ctx.timer
    ev = recipe.evaluation
    tasks_before, tasks_after = before.get("tasks") or {}, after.get("tasks") or {}
    for n, r in enumerate(stage_reports):
        timer.timings[f"stage {n} {r['kind']} {r['method']}"] = r["seconds"]
    source = ctx.handle.source
    return {
        "schema_version": SCHEMA_VERSION,
        "versions": versions(lm_eval=bool(ev.tasks)),
        "model": {"spec": source.spec, "kind": source.kind, "model_type": model.config.model_type,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "parameters_before": params_before, "parameters": measure.parameters(model),
                  "nonzero_parameters_before": nonzero_before, "nonzero_parameters": ctx.handle.nonzero(),
                  "hidden_size": model.config.hidden_size, "sliced": getattr(model.config, "sparsellm_slicing", None) is not None,
                  "per_layer_widths": getattr(model.config, "sparsellm_structure", None) is not None,
                  "disk_bytes": None, **source_info(source)},
        "recipe": recipe.dump(),
        "calibration": None if windows is None else {
            "dataset": recipe.calibration.dataset, "nsamples": int(windows.shape[0]),
            "seqlen": ctx.seqlen, "seed": recipe.seed, "tokens": int(windows.numel()),
            **({"bos": True} if ctx.bos is not None else {})},
        "device": str(ctx.device),
        "stages": stage_reports,
        "allocation": ctx.results.get("allocation"),
        "sparsity": after["sparsity"],
        "perplexity": {"seqlen": eval_seqlen, "limit": ev.limit, "chunks": after.get("chunks") or {},
                       **({"bos": True} if ctx.bos is not None else {}),
                       "before": before.get("ppl") or {}, "after": after.get("ppl") or {}} if ev.ppl else None,
        "zeroshot": {"tasks": list(tasks_after), "limit": ev.task_limit, "num_fewshot": ev.num_fewshot,
                     "batch_size": ev.task_batch_size, "apply_chat_template": ev.apply_chat_template,
                     "before": tasks_before, "after": tasks_after,
                     "mean_acc_before": mean_accuracy(tasks_before), "mean_acc_after": mean_accuracy(tasks_after)}
                    if ev.tasks else None,
        "speed": after.get("speed"),
        "timings": timer.timings,
        "memory": {"rss_after_load_bytes": load_memory[0], "peak_rss_load_bytes": load_memory[1],
                   "peak_rss_bytes": memory.process_peak_bytes()},
        # what a resumed run took from its checkpoint (passes: decoder layers restored), else null
        "resumed": (ctx.checkpoint.resumed or None) if ctx.checkpoint is not None else None,
        # a run that read and wrote the model layer by layer (lowmem): why, and the checkpoint's size
        "low_memory": ctx.handle.report_block(),
    }


def write_extras(folder: Path, recipe, report: dict, name: str, artifacts: dict | None = None,
                 dtype: torch.dtype | None = None, dense_bytes: int | None = None) -> None:
    """Everything in the output besides the model weights (already written): their size, format and dtype
    in the report (with the size of a dense export of that dtype), the recipe, the stages' files, the
    report and card."""
    report["model"]["disk_bytes"] = disk_bytes(folder)
    report["export"] = {"format": recipe.export.format, "weights_bytes": report["model"]["disk_bytes"],
                        "dtype": None if dtype is None else str(dtype).removeprefix("torch."), "dense_bytes": dense_bytes}
    (folder / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    for file, write in (artifacts or {}).items():
        write(folder / file)
    report["memory"]["peak_rss_bytes"] = memory.process_peak_bytes()  # the export included
    write_report(folder, report, name=name)
    fault_point("export")


def _main_process() -> bool:
    """Whether this process writes the output: the only one, or rank 0 under `accelerate launch`/torchrun
    (known from the launcher's RANK before any stage initializes torch.distributed)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _check_options(options: RunOptions) -> None:
    if options.resume and not options.checkpoint_dir:
        raise RecipeError("--resume needs --checkpoint-dir DIR, the folder the interrupted run saved its progress to")
    if options.checkpoint_dir and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("--checkpoint-dir works with one process; run without it under accelerate launch")


# ---- the run -----------------------------------------------------------------------------------

def run_recipe(recipe, output: str | Path | None, options: RunOptions, model_spec: str | None = None,
               handle: ModelHandle | None = None) -> dict:
    """Run a recipe end to end; returns the report written to the output folder (`output` None: the
    compressed model stays in memory, in `handle`, and nothing is written). `handle`: a model already
    opened (sparsellm.oneshot on a model object), else `model_spec` or the recipe's model is loaded."""
    torch.manual_seed(recipe.seed)
    out = None if output is None else Path(output)
    if out is not None:
        check_output(out, options.overwrite)
    _check_options(options)
    device = resolve_device(options.device)
    ev = recipe.evaluation
    if ev.tasks:  # an unknown task name fails here, before the model is loaded
        task_manager(ev.tasks, ev.task_paths)
    stages = build_stages(recipe)
    timer = Timer()
    memory.reset_peak()
    if handle is None:
        check_families(stages, model_spec or recipe.model)
        with timer("load"):
            handle = open_model(model_spec or recipe.model, recipe, options)
    if options.checkpoint_dir:
        check_folder(Path(options.checkpoint_dir), options.resume, out)
    ctx = RunContext(handle=handle, adapter=handle.adapter, tokenizer=handle.tokenizer, recipe=recipe, device=device,
                     timer=timer)
    check_stages(stages, ctx)
    if ev.tasks and ev.apply_chat_template:
        check_chat_template(handle.tokenizer, handle.source.spec)
    load_memory = memory.current_rss_bytes(), memory.peak_rss_bytes()
    ctx.seqlen = default_seqlen(ctx.model, recipe.calibration.seqlen)
    eval_seqlen = default_seqlen(ctx.model, ev.seqlen or ctx.seqlen)
    ctx.windows = calibration(ctx, stages, timer)
    for stage in stages:
        stage.prepare(ctx)
    if options.checkpoint_dir:  # after loading: the fingerprint needs the dense weights and the windows
        ctx.checkpoint = Checkpoint(options.checkpoint_dir, fingerprint(handle.weights(), recipe, ctx.windows), options.resume)

    params_before = measure.parameters(ctx.model)
    nonzero_before = handle.nonzero()
    handle.count_dense()
    before: dict = {}
    if ev.tasks and ev.before:
        with timer("lm-eval before"):
            before["tasks"] = remembered(ctx, "zeroshot_before", lambda: on_device(ctx, lambda: evaluate_tasks_of(ctx, "before")))
    if ev.ppl and ev.before:
        with timer("perplexity before"):
            before["ppl"] = remembered(ctx, "ppl_before", lambda: on_device(ctx, lambda: evaluate_all(ctx, eval_seqlen, "before")))

    main = _main_process() and out is not None  # under `accelerate launch` every process runs the stages; one writes
    with (atomic_folder(out, options.overwrite) if main else nullcontext()) as tmp:
        if main:
            handle.begin(tmp)  # a streamed model writes each finished layer there
        stage_reports = run_stages(stages, ctx)
        after: dict = {"chunks": {}}
        if ev.ppl:
            with timer("perplexity after"):  # a streamed model's compressed layers are read back from the output
                after["ppl"] = on_device(ctx, lambda: evaluate_all(ctx, eval_seqlen, "after", after["chunks"]))
        if ev.tasks:
            with timer("lm-eval after"):
                after["tasks"] = on_device(ctx, lambda: evaluate_tasks_of(ctx, "after"))
        if ev.speed is not None:
            with timer("speed"):
                after["speed"] = measure_speed_against_dense(ctx, options, ev.speed)
        after["sparsity"] = handle.sparsity()
        report = build_report(ctx, eval_seqlen=eval_seqlen, stage_reports=stage_reports, before=before, after=after,
                              load_memory=load_memory, params_before=params_before, nonzero_before=nonzero_before)
        if not main:
            return report
        dtype = handle.export_dtype(recipe.export.dtype)
        with timer("export"):
            dense_bytes = handle.save(tmp, recipe.export.format, dtype)
        write_extras(tmp, recipe, report, out.name, ctx.artifacts, dtype, dense_bytes)
    if ctx.checkpoint is not None:
        ctx.checkpoint.remove()  # the output is complete: nothing left to resume
    log.info("wrote %s (sparsity %.4f)", out, report["sparsity"]["overall"])
    return report


def model_handle(model, tokenizer, spec: str | None = None) -> ModelHandle:
    """A handle on a model object already in memory (or dispatched by accelerate), for run_recipe."""
    from .loading.models import ModelSource, resolve_model

    name = spec or getattr(model.config, "_name_or_path", None) or "in-memory model"
    # a model loaded from a local folder is described by that folder (licence, size) in the report and card
    source = resolve_model(name) if Path(name).is_dir() else ModelSource(spec=name, kind="object", path=name)
    cls = OffloadedHandle if is_dispatched(model) else ModelHandle
    return cls(model, tokenizer, get_adapter(model), source)


compress = run_recipe  # the name earlier versions and scripts use
