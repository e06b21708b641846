#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, integration tests on SmolLM2-135M included. Their text
# is the demo's (data/lee_calib.txt, data/lee_eval.txt, fetched by scripts/get_demo_data.sh when absent;
# a failed fetch fails here, loudly, rather than letting the tests run on other text).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/get_demo_data.sh
exec .venv/bin/python -m pytest "$@"
