"""2:4 acceleration with PyTorch semi-structured sparse tensors: which Linear weights qualify (checked
on CPU), and the one-line refusal without a CUDA GPU. The GPU path itself runs in scripts/bench_24.py."""
import pytest
import torch
from click.testing import CliRunner

from conftest import TEXT
from sparsellm import accelerate_24, load
from sparsellm.cli import cli
from sparsellm.compress.masks import nm_mask
from sparsellm.errors import RecipeError
from sparsellm.loading.semi_structured import check_cuda, ineligible_reason


def weight_24(rows: int, cols: int, dtype=torch.float16) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    w[nm_mask(w.abs(), 2, 4)] = 0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_24_half_precision_tile_multiple_is_eligible(dtype):
    assert ineligible_reason(weight_24(128, 256, dtype)) is None
    assert ineligible_reason(weight_24(4096, 11008, dtype)) is None  # Llama-7B down_proj


def test_ineligible_layers_say_why():
    assert ineligible_reason(weight_24(128, 256, torch.float32)) == "dtype float32 (the kernels take float16 or bfloat16)"
    assert ineligible_reason(weight_24(48, 256)) == "shape 48x256 is not a multiple of the kernels' 32x64 tile"
    assert ineligible_reason(weight_24(64, 96)) == "shape 64x96 is not a multiple of the kernels' 32x64 tile"
    dense = torch.randn(64, 128).half()
    assert ineligible_reason(dense) == "not 2:4 sparse along its inputs"
    w = weight_24(64, 128)
    w[0, :4] = 1.0  # one group with 4 nonzeros
    assert ineligible_reason(w) == "not 2:4 sparse along its inputs"
    # 2:4 along the outputs (the transpose) is not 2:4 along the inputs
    assert ineligible_reason(weight_24(128, 64).t().contiguous()) == "not 2:4 sparse along its inputs"


def test_on_cpu_one_line_errors(model_dirs):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).half()
    with pytest.raises(RecipeError, match="needs a CUDA GPU"):
        accelerate_24(model)
    with pytest.raises(RecipeError, match="needs a CUDA GPU"):
        load(str(model_dirs["llama"]), semi_structured=True, device="cpu")
    r = CliRunner().invoke(cli, ["eval", "--model", str(model_dirs["llama"]), "--ppl", str(TEXT), "--semi-structured"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == ("error: semi-structured 2:4 acceleration needs a CUDA GPU (compute "
                                                  "capability 8.0+); run on a GPU with --device cuda, or drop "
                                                  "--semi-structured")


def test_hopper_without_cusparselt_refuses_instead_of_failing_later(monkeypatch, model_dirs):
    """PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only (seen on an H200: 'Supported only
    on GPUs with compute capability 8.x' at the first matmul): on 9.x without cuSPARSELt the device check
    that load() and `sparsellm eval` run before loading refuses in one line, and accelerate_24 (which runs
    the same check) leaves the model untouched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="needs cuSPARSELt"):
        check_cuda(torch.device("cuda"))
    with pytest.raises(RecipeError, match="needs cuSPARSELt"):
        load(str(model_dirs["llama"]), semi_structured=True, device="cuda")
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False).half())
    model[0].weight.data = weight_24(128, 256)
    with pytest.raises(RecipeError):
        accelerate_24(model)
    assert type(model[0].weight) is torch.nn.Parameter and model[0].weight.layout == torch.strided
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert check_cuda(torch.device("cuda")) == (9, 0)  # with cuSPARSELt 9.x passes
