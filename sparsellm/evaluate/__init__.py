from .perplexity import perplexity
from ..measure import sparsity_summary
from .outputs import write_report

__all__ = ["perplexity", "sparsity_summary", "write_report"]
