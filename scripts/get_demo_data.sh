#!/usr/bin/env bash
# Real English text for the demo without the model hub: the Lee background corpus (300 ABC news
# stories, Lee, Pincombe & Welsh 2005; LGPL-2.1) ships in the test data of gensim 4.4.0 on PyPI.
# Only the wheel is downloaded (not installed); documents 1-200 -> data/lee_calib.txt (calibration),
# 201-300 -> data/lee_eval.txt (evaluation), the same split as the project's benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -s data/lee_calib.txt ] && [ -s data/lee_eval.txt ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps gensim==4.4.0 -d "$tmp"
mkdir -p data
"$PY" - "$tmp" <<'PYEOF'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/gensim-*")[0]
with zipfile.ZipFile(wheel) as z:
    text = z.read("gensim/test/test_data/lee_background.cor").decode("utf-8")
docs = [line for line in text.split("\n") if line.strip()]
assert len(docs) == 300, len(docs)
open("data/lee_calib.txt", "w", encoding="utf-8").write("\n".join(docs[:200]) + "\n")
open("data/lee_eval.txt", "w", encoding="utf-8").write("\n".join(docs[200:]) + "\n")
print("data: wrote data/lee_calib.txt (200 documents) and data/lee_eval.txt (100 documents)")
PYEOF
