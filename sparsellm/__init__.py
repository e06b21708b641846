"""sparsellm: post-training compression of Hugging Face causal language models."""
__version__ = "0.1.0"


def load(path: str, dtype: str = "auto", trust_remote_code: bool = False, allow_pickle: bool = False):
    """Load a compressed (or any supported) model folder/GGUF: returns (model, tokenizer).
    Pickle weights (pytorch_model.bin) are refused unless allow_pickle: they can run code when loaded."""
    from .loading import load_model

    loaded = load_model(path, dtype, trust_remote_code, allow_pickle)
    return loaded.model, loaded.tokenizer
