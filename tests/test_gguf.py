"""GGUF input read without gguf.GGUFReader: the tensor table, the raw views and the chunked dequantization
equal what the gguf package reads and computes, bit for bit."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from sparsellm.errors import ModelLoadError  # noqa: E402
from sparsellm.loading.gguf import check_gguf, dequantized, gguf_tensors, tensor_array  # noqa: E402

KINDS = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0)


def _values(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _write(path, tensors):
    """A GGUF file holding `tensors` ({name: (float32 array, kind)}), each quantized to its kind."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for name, (x, kind) in tensors.items():
        if kind == Q.F32:
            writer.add_tensor(name, x)
        elif kind == Q.F16:
            writer.add_tensor(name, x.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(x, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tensor_table_and_views_equal_gguf_readers(tmp_path):
    tensors = {f"blk.0.t{i}.weight": (_values(shape, i), kind)
               for i, (kind, shape) in enumerate(zip(KINDS * 2, [(6, 64), (3, 5, 32), (7, 96), (4, 64), (5, 32),
                                                                  (64,), (2, 3, 64), (9, 32), (2, 2, 32), (3, 256)]))}
    path = _write(tmp_path / "m.gguf", tensors)
    check_gguf(path, "m.gguf")
    table = gguf_tensors(path)
    reader = gguf.GGUFReader(str(path))
    assert [t.name for t in table] == [t.name for t in reader.tensors] == list(tensors)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for ours, theirs in zip(table, reader.tensors):
        assert ours.dims == tuple(int(d) for d in theirs.shape) and ours.kind == theirs.tensor_type
        assert ours.start == theirs.data_offset and ours.nbytes == theirs.n_bytes
        view = tensor_array(data, ours)
        assert view.dtype == theirs.data.dtype and view.shape == theirs.data.shape
        assert np.array_equal(view, theirs.data) and not view.flags.writeable  # a view of the file, read-only
        whole = dequantize(theirs.data, theirs.tensor_type)
        for chunk in (1, 64, 1 << 24):  # one element (a row at a time), a few rows, the whole tensor
            assert np.array_equal(dequantized(view, ours, chunk), whole), (ours.name, chunk)
        x, kind = tensors[ours.name]
        if kind in (Q.F32, Q.F16, Q.BF16):  # near-lossless kinds: the values come back
            np.testing.assert_allclose(dequantized(view, ours), x, rtol=1e-2, atol=1e-2)


def test_a_tensor_listed_twice_is_refused(tmp_path):
    path = _write(tmp_path / "m.gguf", {"aaaa.weight": (_values((2, 32), 0), Q.F32),
                                        "bbbb.weight": (_values((2, 32), 1), Q.F32)})
    path.write_bytes(path.read_bytes().replace(b"bbbb.weight", b"aaaa.weight"))
    with pytest.raises(ModelLoadError, match=r"m.gguf is not a valid GGUF file \(tensor aaaa.weight is listed twice\)"):
        check_gguf(path, "m.gguf")


def test_a_conversion_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    """The float32 conversion goes to TMPDIR: without room for it, one line naming the fix (exit 3), and no
    temporary folder is left."""
    import shutil
    import tempfile
    from collections import namedtuple

    from sparsellm.loading import gguf as conversion

    path = _write(tmp_path / "m.gguf", {"token_embd.weight": (_values((512, 64), 0), Q.Q8_0)})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda where: usage(10**9, 10**9 - 100_000, 100_000))
    with pytest.raises(ModelLoadError) as e:
        conversion.convert(path, "m.gguf", False)
    assert str(e.value) == (f"m.gguf is converted into 0.00 GiB of float32 safetensors in the temporary folder {scratch}, "
                            "which has 0.00 GiB free; set TMPDIR to a folder with room")
    assert e.value.exit_code == 3 and not list(scratch.iterdir())


def _gguf_model(model_type: str):
    """A tiny random model whose config a GGUF file states whole: eps exact in float32, the widths transformers'
    GGUF loader assumes where it reads none (Qwen3's head_dim 128, the experts' widths), Qwen3-MoE's normalised
    top-k."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=2.0 ** -20, tie_word_embeddings=False)
    extra = {"qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=768, norm_topk_prob=True),
             "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2)}.get(model_type, {})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, **extra), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "qwen2_moe", "qwen3_moe"])
def test_gguf_of_each_family_converts_to_transformers_own_load(model_type, tokenizer, tmp_path):
    """A GGUF of a dense or mixture-of-experts family, converted tensor by tensor (the MoE processors stack
    each layer's experts into gate_up_proj / down_proj), gives the weights transformers' own GGUF loader gives
    and the source model's, bit for bit, the source's logits (to float32 rounding) and its token ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import write_hf_as_gguf
    from sparsellm.loading.models import load_model

    source = _gguf_model(model_type)
    path = write_hf_as_gguf(source, tokenizer, tmp_path / "m.gguf")
    ours = load_model(str(path))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    a, b, c = source.state_dict(), theirs.state_dict(), ours.model.state_dict()
    assert sorted(a) == sorted(b) == sorted(c)
    assert all(torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]) for k in a)
    ids = torch.tensor([[1, 5, 9, 30, 41, 77, 100, 200, 250, 300]])
    with torch.no_grad():  # equal weights; the loaded ones are memory-mapped from the shards, whose alignment
        # can pick other kernels: logits agree to float32 rounding (measured: at most 1e-7 apart)
        assert torch.allclose(source(ids).logits, ours.model(ids).logits, rtol=0, atol=1e-5)
    text = "the quick brown fox jumps over the lazy dog"
    assert ours.tokenizer(text).input_ids == tokenizer(text).input_ids


def test_mixture_of_experts_gguf_prunes_every_expert_exactly(tokenizer, tmp_path):
    """sparsellm prune on a Qwen3-MoE GGUF file: every expert matrix of the output has exactly 50 % zeros per
    row, the router stays dense, and the output reloads with stock transformers."""
    import json

    import torch
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from conftest import TEXT, write_hf_as_gguf
    from sparsellm.cli import cli

    path = write_hf_as_gguf(_gguf_model("qwen3_moe"), tokenizer, tmp_path / "m.gguf")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["prune", "--model", str(path), "--method", "wanda", "--sparsity", "0.5", "--calib",
                                 str(TEXT), "--nsamples", "4", "--seqlen", "32", "--export-dtype", "float32",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for w in (experts.gate_up_proj, experts.down_proj):  # [experts, out, in]
            assert torch.equal((w == 0).sum(-1), torch.full(w.shape[:2], w.shape[-1] // 2))
        assert int((layer.mlp.gate.weight == 0).sum()) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["kind"] == "gguf"
