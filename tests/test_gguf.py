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
