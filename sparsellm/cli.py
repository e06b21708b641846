"""Command line: `sparsellm prune` and `sparsellm eval`."""
from __future__ import annotations

import json
import logging
import sys

import click

from .errors import EXIT_INTERRUPTED, RecipeError, SparseLLMError

log = logging.getLogger("sparsellm")

EXIT_CODES = """\b
Exit codes: 0 ok, 1 unexpected error, 2 invalid recipe or options, 3 model cannot be
loaded, 4 unsupported architecture, 5 bad calibration/evaluation data, 6 output cannot
be written, 7 method cannot be applied to a layer, 130 interrupted."""


@click.group(epilog=EXIT_CODES)
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
@click.pass_context
def prune(ctx, model_spec, recipe_path, method, sparsity, pattern, slicing, rotation, allocate, refine, calib, nsamples, seqlen, seed, ppl, output,
          overwrite, device, dtype, trust_remote_code):
    """Compress a model with a recipe and write a safetensors model folder plus report.json/report.md.

    \b
    Examples:
      sparsellm prune --recipe recipes/wanda-2of4.yaml --model ./llama -o out/
      sparsellm prune --method sparsegpt --sparsity 0.5 --calib c4 --ppl wikitext2 -o out/
      sparsellm prune --method wanda --pattern 4:8 --calib docs.jsonl --nsamples 64 --seqlen 1024 -o out/
      sparsellm prune --allocate owl --method wanda --sparsity 0.7 --refine dsnot -o out/
      sparsellm prune --slicing 0.25 --calib docs.txt -o out/          # SliceGPT: a smaller dense model
      sparsellm prune --slicing 0.2 --rotation uniform --method wanda --pattern 2:4 -o out/

    Options given here override the recipe's calibration/evaluation settings. The output folder
    appears only when complete; it holds model.safetensors, config, tokenizer, recipe.yaml,
    report.json and report.md."""
    from .pipeline import RunOptions, compress
    from .recipe import load_recipe, recipe_from_dict

    def run():
        inline = (method, sparsity, pattern, slicing, rotation, allocate, refine)
        if recipe_path and any(v is not None for v in inline):
            raise RecipeError("give either --recipe or --method/--sparsity/--pattern/--slicing/--rotation/--allocate/"
                              "--refine, not both")
        if rotation and slicing is None:
            raise RecipeError("--rotation needs --slicing")
        if (allocate or refine) and not method:
            raise RecipeError("--allocate and --refine need --method")
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
        report = compress(recipe, output, RunOptions(device, dtype, trust_remote_code, overwrite), model_spec)
        ppl_after = (report.get("perplexity") or {}).get("after") or {}
        summary = ", ".join(f"ppl {k}={v:.3f}" for k, v in ppl_after.items())
        m = report["model"]
        size = f", parameters {m['parameters_before']:,} -> {m['parameters']:,}" if m["parameters"] != m["parameters_before"] else ""
        click.echo(f"{output}: sparsity {report['sparsity']['overall']:.4f}{size}" + (f", {summary}" if summary else ""))

    _guarded(ctx, run)


@cli.command("eval")
@click.option("--model", "model_spec", help=MODEL_HELP)
@click.option("--ppl", multiple=True, required=True, help="Data to measure perplexity on (repeatable): " + DATA_HELP)
@click.option("--seqlen", type=int, default=None, help="Tokens per chunk (default min(2048, context)).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate at most this many chunks.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--trust-remote-code", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def evaluate(ctx, model_spec, ppl, seqlen, batch_size, limit, device, dtype, trust_remote_code, as_json):
    """Perplexity of a model (exp of the mean next-token NLL over non-overlapping chunks)."""
    from .data import evaluation_chunks
    from .evaluate import perplexity
    from .loading import load_model
    from .pipeline import default_seqlen, resolve_device

    def run():
        for name, val in (("--seqlen", seqlen), ("--batch-size", batch_size), ("--limit", limit)):
            if val is not None and val <= 0:
                raise RecipeError(f"{name} must be positive, got {val}")
        dev = resolve_device(device)
        loaded = load_model(model_spec, dtype, trust_remote_code)
        model = loaded.model.to(dev)
        n = default_seqlen(model, seqlen)
        results = {}
        for source in ppl:
            chunks = evaluation_chunks(loaded.tokenizer, source, n, limit)
            results[source] = perplexity(model, chunks, batch_size, dev)
        if as_json:
            click.echo(json.dumps({"model": loaded.source.spec, "seqlen": n, "perplexity": results}))
        else:
            for source, value in results.items():
                click.echo(f"{source}: perplexity {value:.3f} (seqlen {n})")

    _guarded(ctx, run)


def _guarded(ctx, fn) -> None:
    """One clear line and a documented exit code for every expected failure."""
    try:
        fn()
    except SparseLLMError as e:
        if ctx.obj["debug"]:
            log.exception("failed")
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted; no output was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except FloatingPointError as e:
        click.echo(f"error: {e}; try float32 (--dtype float32) or more calibration data", err=True)
        sys.exit(1)


def main() -> None:
    cli(prog_name="sparsellm")


if __name__ == "__main__":
    main()
