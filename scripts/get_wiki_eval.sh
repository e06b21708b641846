#!/usr/bin/env bash
# A second evaluation text of another domain than the Lee news corpus: encyclopedia articles, the
# English Wikipedia sample that gensim's wheel ships for its tests (enwiki-latest-pages-articles1,
# shortened; CC BY-SA), wiki markup stripped to plain paragraphs. Writes data/wiki_eval.txt (one
# paragraph a line; the first 6 paragraphs of each of the first 40 articles that are not redirects). Used to check that a recipe
# calibrated on the news text is not just adapted to news (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -s data/wiki_eval.txt ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps gensim==4.4.0 -d "$tmp"
mkdir -p data
"$PY" - "$tmp" <<'PYEOF'
import bz2, glob, html, re, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/gensim-*")[0]
with zipfile.ZipFile(wheel) as z:
    raw = bz2.decompress(z.read("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")).decode("utf-8")


def strip_nested(text, open_, close):
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean(wiki):
    t = html.unescape(wiki)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = strip_nested(strip_nested(t, "{{", "}}"), "{|", "|}")
    t = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", t)
    t = re.sub(r"\[\[([^|\]]*\|)?([^\]]*)\]\]", r"\2", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]|\[https?://\S+\]", r"\1", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"'{2,}", "", t)
    paras = []
    for line in t.split("\n"):
        line = line.strip()
        if not line or line.startswith(("=", "*", "#", ":", ";", "|", "!")) or len(line) < 80:
            continue
        paras.append(re.sub(r"\s+", " ", line))
    return paras


pages = re.findall(r"<page>.*?<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>.*?</page>", raw, flags=re.S)
out, n = [], 0
for title, text in pages:
    if text.lstrip().upper().startswith("#REDIRECT"):
        continue
    paras = clean(text)
    if paras:
        out += paras[:6]
        n += 1
    if n == 40:
        break
open("data/wiki_eval.txt", "w", encoding="utf-8").write("\n".join(out) + "\n")
print(f"data: wrote data/wiki_eval.txt ({n} articles, {len(out)} paragraphs)")
PYEOF
