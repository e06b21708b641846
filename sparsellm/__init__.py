"""sparsellm: post-training compression of Hugging Face causal language models."""
__version__ = "0.1.0"


def load(path: str, dtype: str = "auto", trust_remote_code: bool = False, allow_pickle: bool = False,
         semi_structured: bool = False, device: str = "cuda"):
    """Load a compressed (or any supported) model folder/GGUF: returns (model, tokenizer). Folders in
    any export format (dense, sparse-bitmask, sparse-24-bitmask) load as ordinary dense models.
    Pickle weights (pytorch_model.bin) are refused unless allow_pickle: they can run code when loaded.
    semi_structured: move the model to `device` (CUDA) and run its 2:4 Linear weights on the sparse
    tensor cores (see accelerate_24; use dtype float16 or bfloat16)."""
    import torch

    from .loading import load_model
    from .loading.semi_structured import accelerate_24, check_cuda

    if semi_structured:
        check_cuda(torch.device(device))  # before the load: fail fast
    loaded = load_model(path, dtype, trust_remote_code, allow_pickle)
    if semi_structured:
        accelerate_24(loaded.model.to(device))
    return loaded.model, loaded.tokenizer


def oneshot(model, recipe, dataset=None, output_dir=None, **options):
    """Compress a model (object or path/hub id) with a recipe (object, dict or YAML path); returns the
    compressed model, and writes the output folder when output_dir is given. See sparsellm.api.oneshot."""
    from .api import oneshot as run

    return run(model, recipe, dataset, output_dir, **options)


def accelerate_24(model) -> dict:
    """Convert the eligible 2:4 Linear weights of a CUDA model to semi-structured sparse tensors in place."""
    from .loading.semi_structured import accelerate_24 as convert

    return convert(model)
