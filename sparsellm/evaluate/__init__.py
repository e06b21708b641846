from .perplexity import perplexity
from .report import sparsity_summary, write_report

__all__ = ["perplexity", "sparsity_summary", "write_report"]
