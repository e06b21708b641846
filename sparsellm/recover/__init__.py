"""Recovery fine-tuning after structured pruning."""
from __future__ import annotations

from .lora import block_ranks, lora_recover

__all__ = ["block_ranks", "lora_recover"]
