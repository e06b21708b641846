from ..errors import RecipeError
from .engine import make_selector, run_layerwise
from .stats import InputStats


def default_seqlen(model, requested: int | None) -> int:
    """Tokens per calibration or evaluation window: `requested`, else min(2048, the model's context)."""
    ctx = getattr(model.config, "max_position_embeddings", None)
    seqlen = requested or min(2048, ctx or 2048)
    if ctx and seqlen > ctx:
        raise RecipeError(f"seqlen {seqlen} exceeds the model's context of {ctx} tokens; use a seqlen of at most {ctx}")
    return seqlen


__all__ = ["run_layerwise", "make_selector", "InputStats", "default_seqlen"]
