#!/usr/bin/env bash
# The evaluation-report demo: SmolLM2-135M compressed five ways, each with perplexity on the Lee
# evaluation text, accuracy on a local multiple-choice task made from that text (lm-eval), speed for
# some, then `sparsellm compare` over all runs and screenshots of the pages. Outputs under runs/.
# Small settings (16 windows x 256 tokens, 16 eval chunks, 100 task examples) keep each run to minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs}
mkdir -p "$OUT"
"$PY" - "$DATA/lee_eval.txt" "$OUT/tasks" <<'PYEOF'
import sys
from sparsellm.evaluate.zeroshot import continuation_task
print(continuation_task(sys.argv[1], sys.argv[2], name="lee_continuation", n=200, words=12, seed=0))
PYEOF
common=(--model smollm2-135m --calib "$DATA/lee_calib.txt" --nsamples 16 --seqlen 256 --ppl "$DATA/lee_eval.txt"
        --tasks lee_continuation --task-path "$OUT/tasks" --limit 100 --overwrite)
run() { local name=$1; shift; "$PY" -m sparsellm prune "${common[@]}" "$@" -o "$OUT/$name" 2>"$OUT/$name.log" | tail -1; }
run magnitude-50 --method magnitude --sparsity 0.5
run wanda-30 --method wanda --sparsity 0.3
run wanda-50 --method wanda --sparsity 0.5
run wanda-70 --method wanda --sparsity 0.7
run wanda-2of4 --method wanda --pattern 2:4 --speed
run sparsegpt-50 --method sparsegpt --sparsity 0.5
run slicegpt-20 --slicing 0.2 --rotation uniform --speed
"$PY" -m sparsellm compare "$OUT"/magnitude-50 "$OUT"/wanda-30 "$OUT"/wanda-50 "$OUT"/wanda-70 "$OUT"/wanda-2of4 \
  "$OUT"/sparsegpt-50 "$OUT"/slicegpt-20 --output "$OUT/compare.html"
shot() { chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --screenshot="$2" --window-size="$3" \
  "file://$(realpath "$1")" >/dev/null 2>&1; echo "screenshot $2"; }
shot "$OUT/wanda-2of4/report.html" "$OUT/report-wanda-2of4.png" 1200,2000
shot "$OUT/slicegpt-20/report.html" "$OUT/report-slicegpt-20.png" 1200,2000
shot "$OUT/compare.html" "$OUT/compare.png" 1300,1400
