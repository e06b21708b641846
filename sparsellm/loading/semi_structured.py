"""2:4-sparse Linear weights as PyTorch semi-structured sparse tensors, for inference on the sparse
tensor cores of NVIDIA GPUs (compute capability 8.0+). Layers that do not qualify stay dense."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import RecipeError
from ..formats import is_24

log = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16)
# The kernels take weights whose rows and columns are multiples of a tile: 32x64 for CUTLASS and
# 16x16 for cuSPARSELt (torch.sparse.semi_structured); the stricter one suits either backend.
TILE = (32, 64)


def ineligible_reason(weight: torch.Tensor) -> str | None:
    """Why a Linear weight cannot become semi-structured (device aside), or None if it can."""
    if weight.dim() != 2:
        return f"{weight.dim()}-D weight"
    if weight.dtype not in DTYPES:
        return f"dtype {str(weight.dtype).removeprefix('torch.')} (the kernels take float16 or bfloat16)"
    rows, cols = weight.shape
    if rows % TILE[0] or cols % TILE[1]:
        return f"shape {rows}x{cols} is not a multiple of the kernels' {TILE[0]}x{TILE[1]} tile"
    if not is_24(weight):
        return "not 2:4 sparse along its inputs"
    return None


def check_cuda(device: torch.device) -> tuple[int, int]:
    """Refuse, before any work, a device the 2:4 kernels cannot run on; returns its compute capability."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RecipeError("semi-structured 2:4 acceleration needs a CUDA GPU (compute capability 8.0+); "
                          "run on a GPU with --device cuda, or drop --semi-structured")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise RecipeError(f"semi-structured 2:4 acceleration needs compute capability 8.0+ (Ampere or newer); "
                          f"this GPU has {major}.{minor}; drop --semi-structured")
    if major != 8 and not torch.backends.cusparselt.is_available():  # PyTorch's CUTLASS 2:4 kernels: 8.x only
        raise RecipeError(f"semi-structured 2:4 on compute capability {major}.{minor} needs cuSPARSELt, which this "
                          "PyTorch build lacks (its CUTLASS kernels run on 8.x only); install a PyTorch CUDA build "
                          "with cuSPARSELt, or drop --semi-structured")
    return major, minor


@torch.no_grad()
def accelerate_24(model: nn.Module) -> dict:
    """Replace every eligible Linear weight of a model already on a CUDA device by its semi-structured
    sparse form (same values: outputs change only by the kernels' rounding). Returns the converted names
    and, per skipped layer, why it stayed dense."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    major, _ = check_cuda(next(model.parameters()).device)
    if not torch.backends.cusparselt.is_available():  # the default backend; CUTLASS ships with every CUDA build
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
    elif major >= 9:
        log.warning("semi-structured: on an H200 (compute capability 9.0, PyTorch 2.11, cuSPARSELt 0.8) the 2:4 kernels "
                    "were measured slower than dense below about 8,000 tokens a call (docs/benchmarks.md, 'On a GPU'): "
                    "check the speed on yours with --speed")
    converted, skipped = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        reason = ineligible_reason(mod.weight)
        if reason is None:
            mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach().contiguous()), requires_grad=False)
            converted.append(name)
        else:
            skipped[name] = reason
            log.info("semi-structured: %s stays dense: %s", name, reason)
    log.log(logging.INFO if converted else logging.WARNING, "semi-structured: %d Linear weights converted, %d stay dense",
            len(converted), len(skipped))
    return {"converted": converted, "skipped": skipped}
