"""load → calibrate → compress → export → report, for one recipe."""
from __future__ import annotations

import logging
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, memory
from .calibrate import make_selector, run_layerwise
from .calibrate.engine import target_linears
from .allocate import allocate
from .checkpoint import Checkpoint, check_folder, fingerprint
from .compress import build_method, build_structured
from .compress.maskllm import learn_masks, save_masks
from .compress.slicegpt import slicegpt
from .compress.structured import structure
from .data import calibration_windows, evaluation_chunks
from .errors import RecipeError
from .evaluate import perplexity, sparsity_summary, write_report
from .evaluate.schema import SCHEMA_VERSION
from .evaluate.speed import compare_speed
from .evaluate.zeroshot import evaluate_tasks, mean_accuracy, task_manager
from .export import atomic_folder, check_output, disk_bytes, save_model
from .faults import fault_point
from .loading import get_adapter, load_model
from .loading.models import source_info
from .lowmem import low_memory_reason, recipe_problem
from .lowmem.offload import OffloadedLayers, is_dispatched, parse_device_map
from .recipe import Recipe
from .recover import lora_recover

log = logging.getLogger(__name__)


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


def model_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def default_seqlen(model, requested: int | None) -> int:
    ctx = model_context(model)
    seqlen = requested or min(2048, ctx or 2048)
    if ctx and seqlen > ctx:
        raise RecipeError(f"seqlen {seqlen} exceeds the model's context of {ctx} tokens; use a seqlen of at most {ctx}")
    return seqlen


def check_stage_fits(model, adapter, spec) -> None:
    """Reject a stage that matches no layer or whose N:M group does not divide a layer's width."""
    select = make_selector(spec.targets, spec.ignore)
    found = 0
    for i, layer in enumerate(adapter.layers(model)):
        for name, lin in target_linears(layer, adapter.layer_prefix(i), select).items():
            found += 1
            if spec.nm and lin.in_features % spec.nm[1]:
                raise RecipeError(f"pattern {spec.pattern}: M={spec.nm[1]} does not divide the input width "
                                  f"{lin.in_features} of {adapter.layer_prefix(i)}.{name}; use an M that divides "
                                  "every targeted layer's width (2:4, 4:8), or ignore that layer")
    if not found:
        raise RecipeError("stage targets/ignore match no Linear layer inside the decoder layers; check the globs "
                          "against module names such as model.layers.0.mlp.down_proj")


def evaluate_all(tokenizer, recipe: Recipe, seqlen: int, label: str, measure, counts: dict | None = None) -> dict[str, float]:
    """Perplexity on each evaluation source; `measure(chunks, desc)` computes one; `counts` receives the
    number of chunks of each."""
    ev = recipe.evaluation
    out = {}
    for source in ev.ppl:
        chunks = evaluation_chunks(tokenizer, source, seqlen, ev.limit)
        out[source] = measure(chunks, f"ppl {label} {Path(source).name}")
        if counts is not None:
            counts[source] = int(chunks.shape[0])
        log.info("perplexity %s on %s: %.3f", label, source, out[source])
    return out


def whole_model_perplexity(model, recipe: Recipe, device):
    return lambda chunks, desc: perplexity(model, chunks, recipe.evaluation.batch_size, device, desc=desc)


def evaluate_tasks_of(model, tokenizer, recipe: Recipe, label: str) -> dict:
    ev = recipe.evaluation
    log.info("lm-eval %s: %s", label, ", ".join(ev.tasks))
    res = evaluate_tasks(model, tokenizer, ev.tasks, ev.task_paths, ev.task_limit, ev.num_fewshot,
                         ev.task_batch_size, recipe.seed)
    for task, r in res.items():
        log.info("%s %s: acc %s", label, task, r.get("acc"))
    return res


def _nonzero(model) -> int:
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


def final_sparsity(model, adapter, dense: dict | None = None, io=None) -> dict:
    """The sparsity report after the stages, with the `removed` figures against `dense` (the summary
    taken before them). With an `io` whose layers were never all in memory (LayerStream,
    OffloadedLayers), both come from the zero counts it took as it first loaded and last wrote each layer."""
    if io is None:
        sparsity = sparsity_summary(model, adapter)
    else:
        layers = range(len(adapter.layers(model)))
        sparsity = sparsity_summary(model, adapter, [io.zeros[i] for i in layers])
        dense = sparsity_summary(model, adapter, [io.dense_zeros[i] for i in layers])
    removed(sparsity, dense)
    return sparsity


def measure_speed_against_dense(model, loaded, options: RunOptions, device, spec) -> dict:
    """Reload the dense model and time it against the compressed one, interleaved on the same device.
    Reloading (rather than a deep copy kept through compression) holds two models only for the
    measurement, not during calibration, whose activations are the other big consumer of memory."""
    dense = load_model(loaded.source.spec, options.dtype, options.trust_remote_code, options.allow_pickle).model
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


def _label(spec) -> str:
    if getattr(spec, "nm", None):
        return f"{spec.method} {spec.pattern}"
    return f"{spec.method} {spec.sparsity}" if getattr(spec, "sparsity", None) is not None else spec.method


def run_stages(model, adapter, recipe: Recipe, methods: list, windows, device,
               checkpoint: Checkpoint | None = None, train: dict | None = None,
               artifacts: dict | None = None, stream=None) -> tuple[list[dict], dict | None]:
    """Run the recipe's stages. An allocate stage sets the per-layer sparsities of the prune stage after
    it; a prune stage and the refine stages right after it share one calibration pass (DSnoT needs the
    statistics of the same inputs the mask was chosen on, and the dense weights). A learn stage trains
    on `train[i]` (token windows) and leaves files to write into the output folder in `artifacts`
    (name → writer(path)). With a checkpoint, finished allocations and layers are taken from it and
    new ones saved to it. With a `stream` (lowmem.LayerStream) the model is an empty skeleton whose
    layers the stream reads (and the prune passes write) one at a time."""
    reports, allocation, block_weight = [], None, None
    stages, batch = recipe.stages, recipe.calibration.batch_size
    i = 0
    while i < len(stages):
        stage, method = stages[i], methods[i]
        memory.reset_peak()
        t = time.perf_counter()
        if stage.kind in ("slice", "structure", "recover", "learn"):
            if stage.kind == "slice":
                details = slicegpt(model, adapter, windows, stage.spec, device, batch)
            elif stage.kind == "structure":
                details = structure(model, adapter, windows, stage.spec, build_structured(stage.spec), device, batch)
                block_weight = details.get("block_weight") or block_weight
            elif stage.kind == "recover":  # the recovery budget follows the coarse importance of the structure stage
                details = lora_recover(model, adapter, windows, stage.spec, recipe.seed, device, block_weight)
            else:
                details, keep = learn_masks(model, adapter, windows, train[i], stage.spec, device, batch, recipe.seed,
                                            checkpoint, key=f"learn{i}")
                if artifacts is not None:
                    artifacts["masks.safetensors"] = lambda path, keep=keep, spec=stage.spec: save_masks(
                        keep, path, spec.pattern, model.config.model_type)
            reports.append(_stage_report(stage, time.perf_counter() - t, details=details))
            i += 1
            continue
        if stage.kind == "allocate":
            prune = stages[i + 1].spec
            select = make_selector(prune.targets, prune.ignore)
            key = f"allocation{i}"
            allocation = checkpoint.result(key) if checkpoint is not None else None
            if allocation is None:
                allocation = allocate(stage.spec, prune, model, adapter, windows, select, device, batch, recipe.seed,
                                      io=stream.reading() if stream is not None else None)
                if checkpoint is not None:
                    checkpoint.put_result(key, allocation)
            methods[i + 1].layer_sparsity = allocation["sparsity"]
            log.info("%s allocation: layer sparsity %.3f..%.3f, realized overall %.4f", stage.spec.method,
                     min(allocation["sparsity"]), max(allocation["sparsity"]), allocation["realized"])
            reports.append(_stage_report(stage, time.perf_counter() - t))
            i += 1
            continue
        j = i + 1
        while j < len(stages) and stages[j].kind == "refine":
            methods[j].nm = stage.spec.nm
            j += 1
        group = list(range(i, j))
        prune_select = make_selector(stage.spec.targets, stage.spec.ignore)
        selects = [prune_select] + [refine_selector(adapter, stages[k].spec, prune_select) for k in group[1:]]
        desc = " + ".join(_label(stages[k].spec) for k in group)
        own = run_layerwise(model, adapter, windows, [methods[k] for k in group], selects, device, batch, desc=desc,
                            checkpoint=checkpoint, pass_key=f"stage{i}", io=stream)
        total = time.perf_counter() - t
        for n, k in enumerate(group):
            # the shared calibration forwards are booked on the prune stage
            secs = total - sum(own[1:]) if n == 0 else own[n]
            reports.append(_stage_report(stages[k], secs, compute_seconds=own[n]))
        i = j
    return reports, allocation


def refine_selector(adapter, spec, prune_select):
    """A refine stage works on what the prune stage pruned, narrowed to its `modules` and globs."""
    sel = make_selector(spec.targets, spec.ignore)

    def select(name: str) -> bool:
        if spec.modules != "all" and adapter.is_attention(name) != (spec.modules == "attention"):
            return False
        return prune_select(name) and sel(name)

    return select


def _stage_report(stage, seconds: float, compute_seconds: float | None = None, details: dict | None = None) -> dict:
    return {"kind": stage.kind, "method": stage.spec.method, "settings": stage.spec.model_dump(mode="json", by_alias=True),
            "seconds": seconds, "compute_seconds": compute_seconds, "peak_rss_bytes": memory.peak_rss_bytes(),
            "peak_cuda_bytes": memory.peak_cuda_bytes(), "details": details}


def _main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def prepare_calibration(model, tokenizer, recipe: Recipe, timer: Timer):
    """Calibration and evaluation lengths, the stages' methods, and the calibration windows (None for
    data-free recipes)."""
    seqlen = default_seqlen(model, recipe.calibration.seqlen)
    eval_seqlen = default_seqlen(model, recipe.evaluation.seqlen or seqlen)
    methods = [build_method(stage.spec) if stage.kind in ("prune", "refine") else None for stage in recipe.stages]
    windows = None
    if any(m is None or m.needs for m in methods):  # data-free recipes skip calibration text
        with timer("calibration data"):
            windows = calibration_windows(tokenizer, recipe.calibration.dataset, recipe.calibration.nsamples, seqlen, recipe.seed)
    return seqlen, eval_seqlen, methods, windows


def build_report(*, source, model, recipe: Recipe, windows, seqlen: int, eval_seqlen: int, device, stage_reports,
                 allocation, sparsity: dict, ppl_before: dict, ppl_after: dict, timer: Timer, load_memory: tuple[int, int],
                 params_before: int, resumed=None, low_memory: dict | None = None, nonzero_before: int | None = None,
                 nonzero_after: int | None = None, chunks: dict | None = None, tasks_before: dict | None = None,
                 tasks_after: dict | None = None, speed: dict | None = None) -> dict:
    """report.json (schema in evaluate/schema.py); nonzero counts are None where the weights were never
    all in memory (low-memory and offloaded runs)."""
    ev = recipe.evaluation
    tasks_before, tasks_after = tasks_before or {}, tasks_after or {}
    for n, r in enumerate(stage_reports):
        timer.timings[f"stage {n} {r['kind']} {r['method']}"] = r["seconds"]
    return {
        "schema_version": SCHEMA_VERSION,
        "versions": versions(lm_eval=bool(ev.tasks)),
        "model": {"spec": source.spec, "kind": source.kind, "model_type": model.config.model_type,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "parameters_before": params_before, "parameters": sum(p.numel() for p in model.parameters()),
                  "nonzero_parameters_before": nonzero_before, "nonzero_parameters": nonzero_after,
                  "hidden_size": model.config.hidden_size, "sliced": getattr(model.config, "sparsellm_slicing", None) is not None,
                  "per_layer_widths": getattr(model.config, "sparsellm_structure", None) is not None,
                  "disk_bytes": None, **source_info(source)},
        "recipe": recipe.model_dump(mode="json"),
        "calibration": None if windows is None else {
            "dataset": recipe.calibration.dataset, "nsamples": int(windows.shape[0]),
            "seqlen": seqlen, "seed": recipe.seed, "tokens": int(windows.numel())},
        "device": str(device),
        "stages": stage_reports,
        "allocation": allocation,
        "sparsity": sparsity,
        "perplexity": {"seqlen": eval_seqlen, "limit": ev.limit, "chunks": chunks or {}, "before": ppl_before,
                       "after": ppl_after} if ev.ppl else None,
        "zeroshot": {"tasks": list(tasks_after), "limit": ev.task_limit, "num_fewshot": ev.num_fewshot,
                     "batch_size": ev.task_batch_size, "before": tasks_before, "after": tasks_after,
                     "mean_acc_before": mean_accuracy(tasks_before), "mean_acc_after": mean_accuracy(tasks_after)}
                    if ev.tasks else None,
        "speed": speed,
        "timings": timer.timings,
        "memory": {"rss_after_load_bytes": load_memory[0], "peak_rss_load_bytes": load_memory[1],
                   "peak_rss_bytes": max(s["peak_rss_bytes"] for s in stage_reports)},
        # what a resumed run took from its checkpoint (passes: decoder layers restored), else null
        "resumed": resumed,
        # a run that read and wrote the model layer by layer (lowmem): why, and the checkpoint's size
        "low_memory": low_memory,
    }


def write_extras(folder: Path, recipe: Recipe, report: dict, name: str, artifacts: dict | None = None) -> None:
    """Everything in the output besides the model weights (already written): their size and format in the
    report, the recipe, the stages' files, the report and card."""
    report["model"]["disk_bytes"] = disk_bytes(folder)
    report["export"] = {"format": recipe.export.format, "weights_bytes": report["model"]["disk_bytes"]}
    (folder / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    for file, write in (artifacts or {}).items():
        write(folder / file)
    write_report(folder, report, name=name)
    fault_point("export")


def compress(recipe: Recipe, output: str | Path, options: RunOptions, model_spec: str | None = None) -> dict:
    """Run a recipe end to end; returns the report written to the output folder."""
    torch.manual_seed(recipe.seed)
    out = Path(output)
    check_output(out, options.overwrite)
    if options.resume and not options.checkpoint_dir:
        raise RecipeError("--resume needs --checkpoint-dir DIR, the folder the interrupted run saved its progress to")
    if options.checkpoint_dir and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("--checkpoint-dir works with one process; run without it under accelerate launch")
    device = resolve_device(options.device)
    ev = recipe.evaluation
    if ev.tasks:  # an unknown task name fails here, before the model is loaded
        task_manager(ev.tasks, ev.task_paths)
    spec = model_spec or recipe.model
    reason = low_memory_reason(spec, recipe, options)
    if reason:
        from .lowmem.run import compress_low_memory  # builds on this module

        return compress_low_memory(recipe, out, options, spec, device, reason)
    device_map = parse_device_map(options.device_map, options.offload_folder)
    if device_map is not None and (problem := recipe_problem(recipe, options, "--device-map")):
        raise RecipeError(f"--device-map: {problem}")
    if options.checkpoint_dir:
        check_folder(Path(options.checkpoint_dir), options.resume, out)
    timer = Timer()
    memory.reset_peak()

    with timer("load"):
        loaded = load_model(spec, options.dtype, options.trust_remote_code, options.allow_pickle, device_map,
                            options.offload_folder)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    # offloaded layers (accelerate hooks): the engine puts their weights in and writes them back
    offloaded = OffloadedLayers(adapter) if is_dispatched(model) else None
    to_device = (lambda m, d: m) if offloaded is not None else (lambda m, d: m.to(d))  # accelerate places it
    for stage in recipe.stages:
        if stage.kind in ("prune", "learn"):
            check_stage_fits(model, adapter, stage.spec)
        if stage.kind == "slice":
            adapter.check_sliceable(model)
        if stage.kind == "structure":
            adapter.structure_names(model)  # unsupported architectures fail before calibration
    load_memory = memory.current_rss_bytes(), memory.peak_rss_bytes()
    seqlen, eval_seqlen, methods, windows = prepare_calibration(model, tokenizer, recipe, timer)

    train = {}
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "learn":
            s = stage.spec
            n = s.nsamples or s.steps * s.batch_size * s.accumulate or 1
            with timer(f"training data {i}"):
                train[i] = calibration_windows(tokenizer, s.dataset or recipe.calibration.dataset, n,
                                               default_seqlen(model, s.seqlen or seqlen), recipe.seed)

    checkpoint = None
    if options.checkpoint_dir:  # after loading: the fingerprint needs the dense weights and the windows
        checkpoint = Checkpoint(options.checkpoint_dir, fingerprint(model, recipe, windows), options.resume)

    params_before = sum(p.numel() for p in model.parameters())
    whole = offloaded is None  # every weight in memory: whole-model nonzero counts
    nonzero_before = _nonzero(model) if whole else None
    dense_summary = sparsity_summary(model, adapter) if whole else None  # offloaded: counted as the engine loads
    measure = whole_model_perplexity(model, recipe, device)
    ppl_before, tasks_before = {}, {}
    if ev.tasks and ev.before:
        tasks_before = checkpoint.result("zeroshot_before") if checkpoint is not None else None
        if tasks_before is None:
            with timer("lm-eval before"):
                to_device(model, device)
                tasks_before = evaluate_tasks_of(model, tokenizer, recipe, "before")
                to_device(model, "cpu")
            if checkpoint is not None:
                checkpoint.put_result("zeroshot_before", tasks_before)
    if ev.ppl and ev.before:
        ppl_before = checkpoint.result("ppl_before") if checkpoint is not None else None
        if ppl_before is None:
            with timer("perplexity before"):
                to_device(model, device)
                ppl_before = evaluate_all(tokenizer, recipe, eval_seqlen, "before", measure)
                to_device(model, "cpu")
            if checkpoint is not None:
                checkpoint.put_result("ppl_before", ppl_before)

    artifacts: dict = {}
    stage_reports, allocation = run_stages(model, adapter, recipe, methods, windows, device, checkpoint, train, artifacts,
                                           offloaded)

    ppl_after, chunks, tasks_after, speed = {}, {}, {}, None
    if ev.ppl:
        with timer("perplexity after"):
            to_device(model, device)
            ppl_after = evaluate_all(tokenizer, recipe, eval_seqlen, "after", measure, chunks)
            to_device(model, "cpu")
    if ev.tasks:
        with timer("lm-eval after"):
            to_device(model, device)
            tasks_after = evaluate_tasks_of(model, tokenizer, recipe, "after")
            to_device(model, "cpu")
    if ev.speed is not None:
        with timer("speed"):
            speed = measure_speed_against_dense(model, loaded, options, device, ev.speed)

    sparsity = final_sparsity(model, adapter, dense_summary, offloaded)
    report = build_report(
        source=loaded.source, model=model, recipe=recipe, windows=windows, seqlen=seqlen, eval_seqlen=eval_seqlen,
        device=device, stage_reports=stage_reports, allocation=allocation, sparsity=sparsity, ppl_before=ppl_before,
        ppl_after=ppl_after, timer=timer, load_memory=load_memory, params_before=params_before,
        resumed=(checkpoint.resumed or None) if checkpoint is not None else None, nonzero_before=nonzero_before,
        nonzero_after=_nonzero(model) if whole else None, chunks=chunks, tasks_before=tasks_before,
        tasks_after=tasks_after, speed=speed)
    if not _main_process():  # under `accelerate launch` every process ran the same stages; one writes
        return report
    with atomic_folder(out, options.overwrite) as tmp:
        with timer("export"):
            save_model(model, tokenizer, tmp, recipe.export.format)
        write_extras(tmp, recipe, report, out.name, artifacts)
    if checkpoint is not None:
        checkpoint.remove()  # the output is complete: nothing left to resume
    log.info("wrote %s (sparsity %.4f)", out, report["sparsity"]["overall"])
    return report
