"""pipeline.compress for a model that is never whole in memory (see the package docstring)."""
from __future__ import annotations

import logging
from pathlib import Path

from safetensors import SafetensorError

from .. import memory
from ..errors import ModelLoadError
from ..export import atomic_folder, make_readable
from ..formats import compress_folder, is_pruned
from ..loading import get_adapter
from ..loading.adapters import _get
from ..loading.models import _load_error, resolve_model
from ..pipeline import (Timer, build_report, check_stage_fits, evaluate_all, final_sparsity, prepare_calibration,
                        run_stages, write_extras)
from . import source_problem
from .stream import LayerStream, empty_model, streamed_perplexity
from .tensors import ShardWriter, TensorSource

log = logging.getLogger(__name__)


def open_stream(spec: str | None, dtype: str, trust_remote_code: bool):
    """A LayerStream over a local safetensors folder (the empty skeleton with the embeddings loaded: every
    pass starts there), its source and its tokenizer."""
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    if problem := source_problem(source):
        raise ModelLoadError(f"--low-memory: {problem}")
    tensors = TensorSource(source.path, source.spec)
    try:
        skeleton = empty_model(source.path, dtype, trust_remote_code, tensors)
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise _load_error(e, source) from e
    stream = LayerStream(skeleton, get_adapter(skeleton.model), tensors)
    for path in stream.adapter.pre_layer_paths:
        if _get(skeleton.model, path) is not None:
            stream.load_module(path)
    return source, stream, tokenizer


def streamed_evaluator(spec: str | None, dtype: str, trust_remote_code: bool, device, batch_size: int):
    """`sparsellm eval --low-memory`: (spec, empty model, tokenizer, measure(chunks, desc) -> perplexity)."""
    source, stream, tokenizer = open_stream(spec, dtype, trust_remote_code)
    return source.spec, stream.model, tokenizer, lambda chunks, desc: streamed_perplexity(
        stream.reading(), chunks, batch_size, device, desc)


def pruned_linears(adapter, zeros: dict, n_layers: int) -> set[str]:
    """The decoder Linears that the bitmask formats compress, from the zero counts taken as each layer
    was written (formats.sparse_linears' rule)."""
    return {f"{adapter.layer_prefix(i)}.{name}" for i in range(n_layers)
            for name, (z, n) in zeros[i].items() if is_pruned(z, n)}


def compress_low_memory(recipe, out: Path, options, spec: str | None, device, reason: str) -> dict:
    timer = Timer()
    memory.reset_peak()
    with timer("load"):
        source, stream, tokenizer = open_stream(spec, options.dtype, options.trust_remote_code)
    model, adapter, tensors = stream.model, stream.adapter, stream.source
    size = tensors.size_bytes()
    log.info("low-memory mode, %s: %.2f GiB of safetensors read one decoder layer at a time", reason, size / 2**30)
    for stage in recipe.stages:
        if stage.kind == "prune":
            check_stage_fits(model, adapter, stage.spec)  # shapes only: works on the empty skeleton
    load_memory = memory.current_rss_bytes(), memory.peak_rss_bytes()
    seqlen, eval_seqlen, methods, windows = prepare_calibration(model, tokenizer, recipe, timer)
    params_before = sum(p.numel() for p in model.parameters())

    def measure(chunks, desc):
        return streamed_perplexity(stream.reading(), chunks, recipe.evaluation.batch_size, device, desc)

    ppl_before = {}
    if recipe.evaluation.ppl and recipe.evaluation.before:
        with timer("perplexity before"):
            ppl_before = evaluate_all(tokenizer, recipe, eval_seqlen, "before", measure)

    n_layers = len(adapter.layers(model))
    with atomic_folder(out, options.overwrite) as tmp:
        # the prune passes write each finished layer to its shard; later passes read it back from there
        stream.writer = ShardWriter(tmp, n_layers + 1)
        stage_reports, allocation = run_stages(model, adapter, recipe, methods, windows, device, stream=stream)
        with timer("export"):
            stream.copy_rest()
            model.config.architectures = [type(model).__name__]  # as save_pretrained records it
            model.config.save_pretrained(tmp)
            if model.can_generate():
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            make_readable(tmp)
        sparsity = final_sparsity(model, adapter, io=stream)
        ppl_after, chunks = {}, {}
        if recipe.evaluation.ppl:
            with timer("perplexity after"):  # reads the compressed layers back from the output's shards
                ppl_after = evaluate_all(tokenizer, recipe, eval_seqlen, "after", measure, chunks)
        if recipe.export.format != "dense":  # after the perplexity, which reads the layers back as dense shards
            with timer("export format"):
                compress_folder(tmp, model, recipe.export.format, pruned_linears(adapter, stream.zeros, n_layers))
        report = build_report(
            source=source, model=model, recipe=recipe, windows=windows, seqlen=seqlen, eval_seqlen=eval_seqlen,
            device=device, stage_reports=stage_reports, allocation=allocation,
            sparsity=sparsity,
            ppl_before=ppl_before, ppl_after=ppl_after, timer=timer, load_memory=load_memory,
            params_before=params_before, chunks=chunks,
            low_memory={"reason": reason, "checkpoint_bytes": size, "shards": n_layers + 1})
        write_extras(tmp, recipe, report, out.name)
    log.info("wrote %s (sparsity %.4f)", out, report["sparsity"]["overall"])
    return report
