"""Command line: `sparsellm prune` and `sparsellm eval`."""
from __future__ import annotations

import json
import logging
import sys

import click

from .errors import EXIT_INTERRUPTED, RecipeError, SparseLLMError

log = logging.getLogger("sparsellm")

EXIT_CODES = """\b
Exit codes: 0 ok, 1 unexpected error, 2 invalid recipe or options (device not available
included), 3 model cannot be loaded, 4 unsupported architecture, 5 bad calibration or
evaluation data, 6 output or checkpoint cannot be written, 7 method cannot be applied to a
layer, 8 NaN/inf during calibration, 9 checkpoint cannot be resumed, 130 interrupted."""


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
@click.version_option(package_name="sparsellm")
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
    Then evaluate any model folder, GGUF file or hub id:
      sparsellm eval --model out/ --ppl eval.txt
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"debug": debug}


MODEL_HELP = "Hub id, local folder, .gguf file, or smollm2-135m (the embedded demo model; the default)."
ALLOW_PICKLE_HELP = "Also load pickle weights (pytorch_model.bin), which can run code: only for checkpoints you trust."
DATA_HELP = "wikitext2, c4 (from the hub) or a local .txt (one document per line) / .jsonl / .json / .parquet (text field)."


@cli.command()
@click.option("--model", "model_spec", help=MODEL_HELP)
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="YAML recipe (see recipes/).")
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), help="One-stage recipe without YAML.")
@click.option("--sparsity", type=float, help="Fraction of weights to zero, in [0, 1).")
@click.option("--pattern", default=None, help='"unstructured" (default) or N:M, e.g. 2:4 = 2 zeros in every 4 weights.')
@click.option("--slicing", type=float, help="SliceGPT first: remove this fraction of the hidden dimension (e.g. 0.25).")
@click.option("--rotation", type=click.Choice(["per-layer", "uniform"]), help="SliceGPT rotation (default per-layer; "
              "uniform gives a stock architecture for Llama/Mistral/Qwen2).")
@click.option("--allocate", type=click.Choice(["owl", "ecoflap"]), help="Vary sparsity per decoder layer (same overall target) before --method.")
@click.option("--refine", type=click.Choice(["dsnot"]), help="Prune-and-grow the mask of --method without changing its sparsity.")
@click.option("--calib", help="Calibration data: " + DATA_HELP)
@click.option("--nsamples", type=int, help="Number of calibration windows (default 128).")
@click.option("--seqlen", type=int, help="Tokens per calibration window (default min(2048, context)).")
@click.option("--seed", type=int, help="Seed for window sampling (default 0).")
@click.option("--ppl", multiple=True, help="Report perplexity before/after on this data (repeatable): " + DATA_HELP)
@click.option("--output", "-o", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--device", default="cpu", show_default=True, help="Compute device for calibration/evaluation: cpu, cuda, cuda:N, auto.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the checkpoint (off by default).")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
@click.option("--checkpoint-dir", type=click.Path(), help="Save progress after every decoder layer to this folder (removed when the run succeeds).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --checkpoint-dir (same model, recipe and data); starts afresh if it holds none.")
@click.option("--low-memory/--in-memory", "low_memory", default=None,
              help="Read and write the model one decoder layer at a time from its safetensors (peak memory about one "
                   "layer plus the activations), or load it whole. Default: low-memory when the checkpoint is larger "
                   "than the available memory. Local safetensors folders; prune/refine stages and OWL.")
@click.option("--device-map", help='accelerate placement of the modules: auto, or JSON like \'{"model.layers.0": "cpu", '
              '"model.layers.1": "disk", ...}\'; "disk" (and "cpu" next to a GPU) offloads a module, whose weights are '
              "put in for its turn and written back compressed.")
@click.option("--offload-folder", type=click.Path(file_okay=False), help="Where --device-map's disk offload keeps weights.")
@click.pass_context
def prune(ctx, model_spec, recipe_path, method, sparsity, pattern, slicing, rotation, allocate, refine, calib, nsamples, seqlen,
          seed, ppl, output, overwrite, device, dtype, trust_remote_code, allow_pickle, checkpoint_dir, resume, low_memory, device_map, offload_folder):
    """Compress a model with a recipe and write a safetensors model folder plus report.json/report.md.

    \b
    Examples:
      sparsellm prune --recipe recipes/wanda-2of4.yaml --model ./llama -o out/
      sparsellm prune --method sparsegpt --sparsity 0.5 --calib c4 --ppl wikitext2 -o out/
      sparsellm prune --method wanda --pattern 4:8 --calib docs.jsonl --nsamples 64 --seqlen 1024 -o out/
      sparsellm prune --allocate owl --method wanda --sparsity 0.7 --refine dsnot -o out/
      sparsellm prune --slicing 0.25 --calib docs.txt -o out/          # SliceGPT: a smaller dense model
      sparsellm prune --slicing 0.2 --rotation uniform --method wanda --pattern 2:4 -o out/
      sparsellm prune --model ./big-llama --method sparsegpt --sparsity 0.5 --low-memory -o out/

    Options given here override the recipe's calibration/evaluation settings. The output folder
    appears only when complete; it holds model.safetensors (with --low-memory: one shard per
    decoder layer and an index), config, tokenizer, recipe.yaml, report.json and report.md. With --checkpoint-dir a killed run continues with --resume:
      sparsellm prune --recipe r.yaml -o out/ --checkpoint-dir ckpt/ [--resume]"""
    from .pipeline import RunOptions, compress
    from .recipe import load_recipe, recipe_from_dict

    def run():
        _positive(("--nsamples", nsamples), ("--seqlen", seqlen))
        inline = (method, sparsity, pattern, slicing, rotation, allocate, refine)
        if recipe_path and any(v is not None for v in inline):
            raise RecipeError("give either --recipe or --method/--sparsity/--pattern/--slicing/--rotation/--allocate/"
                              "--refine, not both")
        if rotation and slicing is None:
            raise RecipeError("--rotation needs --slicing; add e.g. --slicing 0.25")
        if (allocate or refine) and not method:
            raise RecipeError("--allocate and --refine need --method; add e.g. --method wanda")
        if recipe_path:
            data = load_recipe(recipe_path).model_dump(exclude_none=True, exclude_unset=True)
        elif method or slicing is not None:
            stages = []
            if slicing is not None:
                stages.append({"slice": {"method": "slicegpt", "slicing": slicing, **({"rotation": rotation} if rotation else {})}})
            if method:
                stage = {"method": method, "pattern": pattern or "unstructured"}
                if sparsity is not None:
                    stage["sparsity"] = sparsity
                stages += ([{"allocate": {"method": allocate}}] if allocate else []) + [{"prune": stage}]
                stages += [{"refine": {"method": refine}}] if refine else []
            data = {"stages": stages}
        else:
            raise RecipeError("nothing to do: give --recipe FILE, --method NAME or --slicing FRACTION (see sparsellm prune --help)")
        cal = data.setdefault("calibration", {})
        for key, val in (("dataset", calib), ("nsamples", nsamples), ("seqlen", seqlen)):
            if val is not None:
                cal[key] = val
        if seed is not None:
            data["seed"] = seed
        if ppl:
            data.setdefault("evaluation", {})["ppl"] = list(ppl)
        recipe = recipe_from_dict(data, recipe_path or "command line")
        options = RunOptions(device, dtype, trust_remote_code, overwrite, allow_pickle, checkpoint_dir, resume, low_memory,
                             device_map, offload_folder)
        report = compress(recipe, output, options, model_spec)
        ppl_after = (report.get("perplexity") or {}).get("after") or {}
        summary = ", ".join(f"ppl {k}={v:.3f}" for k, v in ppl_after.items())
        m = report["model"]
        size = f", parameters {m['parameters_before']:,} -> {m['parameters']:,}" if m["parameters"] != m["parameters_before"] else ""
        click.echo(f"{output}: sparsity {report['sparsity']['overall']:.4f}{size}" + (f", {summary}" if summary else ""))

    resume_hint = f"; run the same command with --resume to continue from {checkpoint_dir}" if checkpoint_dir else ""
    _guarded(ctx, run, resume_hint)


@cli.command("eval")
@click.option("--model", "model_spec", help=MODEL_HELP)
@click.option("--ppl", multiple=True, required=True, help="Data to measure perplexity on (repeatable): " + DATA_HELP)
@click.option("--seqlen", type=int, default=None, help="Tokens per chunk (default min(2048, context)).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate at most this many chunks.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--trust-remote-code", is_flag=True)
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--low-memory", is_flag=True, help="Read the model one decoder layer at a time from its safetensors "
              "(a local folder) instead of loading it whole; the same numbers.")
@click.pass_context
def evaluate(ctx, model_spec, ppl, seqlen, batch_size, limit, device, dtype, trust_remote_code, allow_pickle, as_json,
             low_memory):
    """Perplexity of a model (exp of the mean next-token NLL over non-overlapping chunks)."""
    from .data import evaluation_chunks
    from .evaluate import perplexity
    from .loading import load_model
    from .pipeline import default_seqlen, resolve_device

    def run():
        _positive(("--seqlen", seqlen), ("--batch-size", batch_size), ("--limit", limit))
        dev = resolve_device(device)
        if low_memory:
            from .lowmem.run import streamed_evaluator

            spec, model, tokenizer, measure = streamed_evaluator(model_spec, dtype, trust_remote_code, dev, batch_size)
        else:
            loaded = load_model(model_spec, dtype, trust_remote_code, allow_pickle)
            spec, model, tokenizer = loaded.source.spec, loaded.model.to(dev), loaded.tokenizer

            def measure(chunks, desc):
                return perplexity(model, chunks, batch_size, dev, desc=desc)
        n = default_seqlen(model, seqlen)
        results = {}
        for source in ppl:
            results[source] = measure(evaluation_chunks(tokenizer, source, n, limit), "perplexity")
        if as_json:
            click.echo(json.dumps({"model": spec, "seqlen": n, "perplexity": results}))
        else:
            for source, value in results.items():
                click.echo(f"{source}: perplexity {value:.3f} (seqlen {n})")

    _guarded(ctx, run)


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
