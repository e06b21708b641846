from .engine import run_layerwise, make_selector
from .stats import InputStats

__all__ = ["run_layerwise", "make_selector", "InputStats"]
