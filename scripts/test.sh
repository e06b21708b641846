#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, integration test on SmolLM2-135M included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
