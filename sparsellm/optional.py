"""Optional dependencies: imported only where a feature needs them, with one line naming the extra to
install when they are missing (pyproject.toml declares the extras)."""
from __future__ import annotations

import importlib

from .errors import RecipeError, SparseLLMError

# module -> (extra, distribution, what needs it)
EXTRAS = {
    "lm_eval": ("eval", "lm-eval", "lm-eval tasks (--tasks, evaluation.tasks)"),
    "gguf": ("gguf", "gguf", "reading a GGUF file (.gguf, the demo model smollm2-135m)"),
    "peft": ("recover", "peft", "LoRA recovery (recover stage, --recover-steps)"),
}


def require(module: str, error: type[SparseLLMError] = RecipeError):
    """Import an optional dependency, or raise `error` (its exit code) saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra, dist, purpose = EXTRAS[module]
        raise error(f"{purpose} needs the {dist} package, which is not installed; "
                    f"install it with: pip install 'sparsellm[{extra}]'") from None
