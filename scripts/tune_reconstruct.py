#!/usr/bin/env python
"""Tuning the reconstruct stage on SmolLM2-135M (docs/benchmarks.md, "Reconstruction of the kept weights").

The benchmark's model, windows and chunks; the prune stage's result is cached in /tmp/s19 (it does not
depend on the reconstruction settings), then the reconstruct stage runs on the first LAYERS blocks (their
held-back errors are printed) or, without LAYERS, on all of them followed by the perplexity on lee_eval
(and, with EXTRA=data/wiki_eval.txt, on its first 24 chunks, with the dense and pruned models' too).

    PYTHONPATH=$PWD .venv/bin/python scripts/tune_reconstruct.py '{"method":"sparsegpt","pattern":"2:4"}' \
        '{"method":"blockwise","epochs":2,"lr":1e-3}' [LAYERS]
"""
import json, sys, time, os, torch, resource
from pathlib import Path
from sparsellm.loading import load_model, get_adapter
from sparsellm.data import calibration_windows, evaluation_chunks
from sparsellm.evaluate import perplexity
from sparsellm.handle import ModelHandle
from sparsellm.pipeline import Timer, run_stages
from sparsellm.stage import RunContext, build_stages
from sparsellm.recipe import recipe_from_dict
torch.set_num_threads(2); torch.manual_seed(0)
prune = json.loads(sys.argv[1]); rec = json.loads(sys.argv[2]); layers = int(sys.argv[3]) if len(sys.argv) > 3 else None
tag = prune["method"] + "-" + str(prune.get("pattern", prune.get("sparsity")))
Path("/tmp/s19").mkdir(exist_ok=True)
cache = Path(f"/tmp/s19/cache-{tag}.pt")
fp32 = "/tmp/s19/smol"
if not Path(fp32).exists():
    l = load_model("smollm2-135m"); l.model.save_pretrained(fp32); l.tokenizer.save_pretrained(fp32)
loaded = load_model(fp32); model, tok = loaded.model, loaded.tokenizer; adapter = get_adapter(model)
windows = calibration_windows(tok, "data/lee_calib.txt", 32, 512, seed=0)
chunks = evaluation_chunks(tok, "data/lee_eval.txt", 512)
def ctx_for(stages):
    recipe = recipe_from_dict({"seed": 0, "calibration": {"batch_size": 8, "dataset": "data/lee_calib.txt", "seqlen": 512}, "stages": stages})
    return recipe, RunContext(handle=ModelHandle(model, tok, adapter, loaded.source), adapter=adapter, tokenizer=tok, recipe=recipe, device=torch.device("cpu"), windows=windows, seqlen=512, timer=Timer())
extra = os.environ.get("EXTRA")
xchunks = evaluation_chunks(tok, extra, 512, 24) if extra else None
if extra:
    print("ppl extra dense", perplexity(model, xchunks, batch_size=4), flush=True)
recipe, ctx = ctx_for([{"prune": prune}, {"reconstruct": rec}])
built = build_stages(recipe)
built[1].prepare(ctx)  # dense copy
if cache.exists():
    model.load_state_dict(torch.load(cache))
    if extra:
        print("ppl extra pruned", perplexity(model, xchunks, batch_size=4), flush=True)
else:
    t = time.perf_counter(); run_stages(built[:1], ctx); print("prune s", time.perf_counter() - t, flush=True)
    torch.save(model.state_dict(), cache)
    print("ppl pruned", perplexity(model, chunks, batch_size=4), flush=True)
if layers:
    full = adapter.layers(model); keep = torch.nn.ModuleList(list(full)[:layers])
    model.model.layers = keep
t, c = time.perf_counter(), time.process_time()
reps = run_stages(built[1:], ctx)
print("rec wall", time.perf_counter() - t, "cpu", time.process_time() - c, flush=True)
for b in reps[0]["details"]["blocks"]:
    print(json.dumps({k: (v if not isinstance(v, dict) else [round(v["heldout_before"], 4), round(v["heldout_after"], 4), round(v["train_before"],4), round(v["train_after"],4), v["best_epoch"], v["epochs"]]) for k, v in b.items()}))
if not layers:
    if extra:
        print("ppl extra rec", perplexity(model, xchunks, batch_size=4), flush=True)
    print("ppl", perplexity(model, chunks, batch_size=4), flush=True)
