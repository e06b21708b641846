"""Export formats: bit packing and per-tensor (de)compression on hand cases, folder round trips,
interoperability with compressed-tensors 0.13.0 (the last layout reference with the sparse compressors),
and the CLI/recipe surface (prune --format, export, eval, load)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import TEXT, tiny_model
from sparsellm import load
from sparsellm.cli import cli
from sparsellm.compress.masks import nm_mask, row_mask
from sparsellm.errors import CompressionError
from sparsellm.export import save_model
from sparsellm.formats import (bitmask_compress, bitmask_decompress, compress_folder, is_24, mask_24, pack_bitmask,
                               read_state_dict, sparse24_compress, sparse24_decompress, unpack_bitmask)

SPARSE = ("sparse-bitmask", "sparse-24-bitmask")


def tensors(path: Path) -> dict:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def pruned(pattern: str, dtype=torch.float32, arch: str = "llama"):
    """A tiny model whose decoder Linears are pruned by magnitude: 2:4 or 50 % per row."""
    model = tiny_model(arch).to(dtype)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight
            w[nm_mask(w.abs(), 2, 4) if pattern == "2:4" else row_mask(w.abs(), 0.5)] = 0
    return model


# ---- one tensor ----------------------------------------------------------------------------------

def test_pack_bitmask_is_little_endian_per_row():
    mask = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    packed = pack_bitmask(mask)
    # row 0: columns 1, 2, 7 -> bits 1, 2, 7 of byte 0 = 2 + 4 + 128; column 8 -> bit 0 of byte 1
    assert packed.dtype == torch.uint8 and packed.tolist() == [[134, 1], [1, 2]]
    assert torch.equal(unpack_bitmask(packed, mask.shape), mask)


def test_bitmask_compress_hand_case():
    w = torch.tensor([[0.0, 2.0, 0.0, 3.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    parts = bitmask_compress(w)
    assert parts["shape"].tolist() == [3, 4] and parts["shape"].dtype == torch.int64
    assert parts["compressed"].tolist() == [2.0, 3.0, 4.0]
    assert parts["bitmask"].tolist() == [[0b1010], [0b0001], [0]]
    assert parts["row_offsets"].tolist() == [0, 2, 3] and parts["row_offsets"].dtype == torch.int64
    assert torch.equal(bitmask_decompress(parts), w)


def test_24_mask_tops_up_groups_with_fewer_than_two_nonzeros():
    w = torch.tensor([[0.0, 0.0, 5.0, 0.0, 1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0]])
    assert mask_24(w).int().tolist() == [[1, 0, 1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 1, 1, 0, 0]]
    parts = sparse24_compress(w)
    assert parts["shape"].tolist() == [[2], [8]]  # compressed-tensors stores it as a column
    assert parts["compressed"].tolist() == [[0.0, 5.0, 1.0, 2.0], [0.0, 0.0, 3.0, 4.0]]
    assert torch.equal(sparse24_decompress(parts), w)


def test_sparse24_rejects_weights_that_are_not_24():
    assert is_24(torch.tensor([[1.0, 0.0, 0.0, 2.0]])) and not is_24(torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    assert not is_24(torch.zeros(2, 6))  # width not a multiple of 4
    with pytest.raises(ValueError, match="not 2:4"):
        sparse24_compress(torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trips_keep_exact_values(dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 12, generator=gen).to(dtype)  # width 12: the last mask byte is partly used
    w[row_mask(w.abs().float(), 0.5)] = 0
    parts = bitmask_compress(w)
    assert parts["compressed"].dtype == dtype and parts["bitmask"].shape == (24, 2)
    assert torch.equal(bitmask_decompress(parts), w)
    w24 = torch.randn(24, 12, generator=gen).to(dtype)
    w24[nm_mask(w24.abs().float(), 2, 4)] = 0
    parts = sparse24_compress(w24)
    assert parts["compressed"].shape == (24, 6)
    assert torch.equal(sparse24_decompress(parts), w24)


def test_corrupt_bitmask_is_a_clear_error():
    parts = bitmask_compress(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    parts["compressed"] = parts["compressed"][:1]
    with pytest.raises(ValueError, match="marks 2 values but 1 are stored"):
        bitmask_decompress(parts)


def test_folder_format_from_config():
    from sparsellm.errors import ModelLoadError
    from sparsellm.formats import folder_format

    def block(**sc):
        return {"quantization_config": {"quant_method": "compressed-tensors", "sparsity_config": sc}}

    assert folder_format({"model_type": "llama"}) == "dense"
    assert folder_format({"quantization_config": {"quant_method": "gptq"}}) == "dense"
    assert folder_format(block(format="sparse-24-bitmask")) == "sparse-24-bitmask"
    assert folder_format({"compression_config": block(format="sparse-bitmask")["quantization_config"]}) == "sparse-bitmask"
    with pytest.raises(ModelLoadError, match="sparsity format 'marlin-24' in config.json is not supported"):
        folder_format(block(format="marlin-24"))
    quantized = block(format="sparse-bitmask")
    quantized["quantization_config"]["config_groups"] = {"group_0": {}}
    with pytest.raises(ModelLoadError, match="also quantizes or transforms"):
        folder_format(quantized)


# ---- model folders -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", SPARSE)
def test_folder_round_trip_and_layout(fmt, tokenizer, tmp_path):
    model = pruned("2:4")
    save_model(model, tokenizer, tmp_path / "m", fmt)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    sc = cfg["quantization_config"]["sparsity_config"]
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sc["format"] == fmt and sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    # the fraction of exact zeros over every stored tensor, counted here on the plain dense folder
    save_model(model, tokenizer, tmp_path / "dense")
    dense = tensors(tmp_path / "dense" / "model.safetensors")
    zeros = sum(int((t == 0).sum()) for t in dense.values()) / sum(t.numel() for t in dense.values())
    assert sc["sparsity_structure"] == "2:4" and sc["global_sparsity"] == round(zeros, 6)
    names = set(tensors(tmp_path / "m" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    parts = {"shape", "compressed", "bitmask"} | ({"row_offsets"} if fmt == "sparse-bitmask" else set())
    assert {f"{q}.{p}" for p in parts} <= names and f"{q}.weight" not in names
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names  # stay dense

    loaded, _ = load(str(tmp_path / "m"))
    assert same_weights(loaded, model)
    assert not hasattr(loaded.config, "quantization_config")


def test_head_and_barely_sparse_layers_stay_dense(tokenizer, tmp_path):
    model = pruned("2:4")
    model.lm_head.weight[:, ::3] = 0  # a head with many zeros (e.g. dequantized) is still not a pruned layer
    model.model.layers[1].mlp.up_proj.weight.normal_()  # left dense (no zeros): not compressed, listed in ignore
    model.model.layers[1].mlp.up_proj.weight[:, :4] = 0  # 3 % zeros: below the 10 % threshold
    save_model(model, tokenizer, tmp_path / "m", "sparse-24-bitmask")
    sc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["ignore"] == ["lm_head", "model.layers.1.mlp.up_proj"]
    names = set(tensors(tmp_path / "m" / "model.safetensors"))
    assert {"lm_head.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.bitmask"} <= names
    assert same_weights(load(str(tmp_path / "m"))[0], model)


def test_default_dense_export_writes_no_sparsity_config(tokenizer, tmp_path):
    model = pruned("2:4")
    save_model(model, tokenizer, tmp_path / "m")
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), model)


def test_bitmask_formats_are_smaller_and_deterministic(tokenizer, tmp_path):
    model = pruned("2:4", torch.bfloat16)
    sizes = {}
    for fmt in ("dense", *SPARSE):
        for n in (1, 2):
            save_model(model, tokenizer, tmp_path / f"{fmt}{n}", fmt)
        a, b = tmp_path / f"{fmt}1" / "model.safetensors", tmp_path / f"{fmt}2" / "model.safetensors"
        assert sha(a) == sha(b), fmt
        sizes[fmt] = a.stat().st_size
    # 2:4 in 16 bits: half the values plus 1 bit per weight (1/16 of the dense bytes) for the Linears
    assert sizes["sparse-24-bitmask"] < sizes["sparse-bitmask"] < sizes["dense"]


@pytest.mark.parametrize("fmt", SPARSE)
def test_sharded_folder(fmt, tmp_path):
    model = pruned("2:4")
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    compress_folder(tmp_path, model, fmt)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    stored = {k: shard for shard in shards for k in tensors(tmp_path / shard)}
    assert index["weight_map"] == stored and "model.layers.1.mlp.down_proj.bitmask" in stored
    assert index["metadata"]["total_size"] == sum(t.nbytes for s in shards for t in tensors(tmp_path / s).values())
    dense, state = read_state_dict(tmp_path, fmt), model.state_dict()
    assert dense.keys() == state.keys() and all(torch.equal(dense[k], v) for k, v in state.items())


def test_sparse24_export_of_unstructured_weights_is_refused(tokenizer, tmp_path):
    with pytest.raises(CompressionError, match="model.layers.0.self_attn.q_proj is not 2:4"):
        save_model(pruned("unstructured"), tokenizer, tmp_path / "m", "sparse-24-bitmask")


def test_unstructured_bitmask_opt_round_trip(tokenizer, tmp_path):
    model = pruned("unstructured", arch="opt")
    save_model(model, tokenizer, tmp_path / "m", "sparse-bitmask")
    sc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["sparsity_structure"] == "unstructured"
    assert same_weights(load(str(tmp_path / "m"))[0], model)


# ---- interoperability with compressed-tensors 0.13.0 ---------------------------------------------

@pytest.mark.parametrize("fmt,pattern", [("sparse-bitmask", "unstructured"), ("sparse-24-bitmask", "2:4")])
def test_compressed_tensors_reads_our_files_and_we_read_theirs(fmt, pattern, tokenizer, tmp_path):
    import compressed_tensors as ct  # pinned in the test extra: its last releases with these compressors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    assert ct.__version__ == "0.13.0"
    model = pruned(pattern, torch.bfloat16)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    save_model(model, tokenizer, ours, fmt)
    # our folder -> their reader, into a model with other weights
    other = tiny_model("llama", seed=1).to(torch.bfloat16)
    ModelCompressor.from_pretrained(str(ours)).decompress(str(ours), other)
    assert same_weights(other, model)
    # their writer (as llm-compressor saves) -> our reader
    config = (BitmaskConfig if fmt == "sparse-bitmask" else Sparse24BitMaskConfig)(targets=["Linear"], ignore=["lm_head"])
    writer = ModelCompressor(sparsity_config=config)
    state = writer.compress(model)
    model.save_pretrained(theirs, state_dict=state)
    writer.update_config(str(theirs))
    tokenizer.save_pretrained(theirs)
    assert same_weights(load(str(theirs))[0], model)
    # and the compressed tensors themselves agree, tensor for tensor
    mine, their_file = tensors(ours / "model.safetensors"), tensors(theirs / "model.safetensors")
    assert mine.keys() == their_file.keys()
    assert all(mine[k].dtype == their_file[k].dtype and torch.equal(mine[k], their_file[k]) for k in mine)


# ---- CLI and recipe ------------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_prune_format_export_back_to_dense_and_eval(model_dirs, tmp_path):
    small, plain = tmp_path / "small", tmp_path / "plain"
    r = run("prune", "--model", model_dirs["llama"], "--method", "magnitude", "--pattern", "2:4", "--calib", TEXT,
            "--format", "sparse-24-bitmask", "-o", small)
    assert r.exit_code == 0, r.output
    report = json.loads((small / "report.json").read_text())
    assert report["export"]["format"] == "sparse-24-bitmask"
    assert report["export"]["weights_bytes"] == (small / "model.safetensors").stat().st_size
    assert "format: sparse-24-bitmask" in (small / "recipe.yaml").read_text()

    r = run("export", small, "--format", "dense", "-o", plain)
    assert r.exit_code == 0, r.output
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    assert {"report.json", "recipe.yaml", "tokenizer.json"} <= {p.name for p in plain.iterdir()}
    assert same_weights(AutoModelForCausalLM.from_pretrained(plain), load(str(small))[0])

    evals = [run("eval", "--model", d, "--ppl", TEXT, "--seqlen", 32, "--limit", 2, "--json") for d in (small, plain)]
    assert all(e.exit_code == 0 for e in evals), [e.output for e in evals]
    assert json.loads(evals[0].stdout)["perplexity"] == json.loads(evals[1].stdout)["perplexity"]


def test_export_converts_dtype(tokenizer, tmp_path):
    save_model(pruned("unstructured"), tokenizer, tmp_path / "m")
    r = run("export", tmp_path / "m", "--format", "sparse-bitmask", "--dtype", "float16", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert tensors(tmp_path / "o" / "model.safetensors")["model.layers.0.mlp.up_proj.compressed"].dtype == torch.float16
    assert next(load(str(tmp_path / "o"))[0].parameters()).dtype == torch.float16


def test_export_refuses_existing_output_and_non_24(model_dirs, tokenizer, tmp_path):
    save_model(pruned("unstructured"), tokenizer, tmp_path / "m")
    r = run("export", tmp_path / "m", "--format", "sparse-24-bitmask", "-o", tmp_path / "o")
    assert r.exit_code == 7 and "is not 2:4 along its inputs" in r.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))
    r = run("export", tmp_path / "m", "--format", "dense", "-o", tmp_path / "m")
    assert r.exit_code == 6 and "already exists" in r.output
    r = run("export", model_dirs["llama"], "--format", "sparse-bitmask", "-o", tmp_path / "o")
    assert r.exit_code == 7 and "no pruned Linear layer" in r.output


def test_recipe_sparse24_needs_24_stages(model_dirs, tmp_path):
    r = run("prune", "--model", model_dirs["llama"], "--method", "magnitude", "--sparsity", 0.5,
            "--format", "sparse-24-bitmask", "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert "export format sparse-24-bitmask needs 2:4 weights, but stages.0 prunes with pattern unstructured" in r.output
    r = run("prune", "--model", model_dirs["llama"], "--slicing", 0.25, "--format", "sparse-bitmask", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "no stage prunes" in r.output


def test_sliced_model_in_bitmask_format(model_dirs, tmp_path):
    """Per-layer SliceGPT (own runtime, extra config fields) then 2:4: the 2:4 format composes."""
    out = tmp_path / "o"
    r = run("prune", "--model", model_dirs["llama"], "--slicing", 0.25, "--method", "magnitude", "--pattern", "2:4",
            "--calib", TEXT, "--nsamples", 4, "--seqlen", 32, "--format", "sparse-24-bitmask", "-o", out)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"].startswith("sparsellm_sliced_") and "sparsellm_slicing" in cfg
    assert cfg["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    r = run("export", out, "--format", "dense", "-o", tmp_path / "d")
    assert r.exit_code == 0, r.output
    assert same_weights(load(str(out))[0], load(str(tmp_path / "d"))[0])


# ---- export dtype ---------------------------------------------------------------------------------

def test_export_dtype_auto_halves_a_dequantized_gguf_only():
    from types import SimpleNamespace

    from sparsellm.export import export_dtype
    from sparsellm.handle import ModelHandle

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert export_dtype("auto", f32, gguf=True) == bf16  # a GGUF source dequantized to float32
    assert export_dtype("auto", f16, gguf=True) == f16  # loaded with --dtype float16: kept
    assert export_dtype("auto", f32, gguf=False) == f32 and export_dtype("auto", bf16, gguf=False) == bf16
    assert export_dtype("float16", f32, gguf=True) == f16 and export_dtype("float32", bf16, gguf=False) == f32
    model = tiny_model("llama")
    gguf = ModelHandle(model, None, None, SimpleNamespace(gguf_file="m.gguf"))
    folder = ModelHandle(model, None, None, SimpleNamespace(gguf_file=None))
    assert gguf.export_dtype("auto") == bf16 and folder.export_dtype("auto") == f32


def test_cli_export_dtype_with_a_bitmask_format(model_dirs, tmp_path):
    """--export-dtype bfloat16 with sparse-24-bitmask: the compressed values are the float32 run's cast, the report
    says the dtype and compares with a dense bfloat16 export (that of the dense run); a recipe's export.dtype
    is kept when --format is given on the command line."""
    common = ("prune", "--model", model_dirs["llama"], "--method", "wanda", "--pattern", "2:4", "--calib", TEXT,
              "--nsamples", 4, "--seqlen", 32, "--ppl", TEXT, "--limit", 2)
    f32, dense, small = tmp_path / "f32", tmp_path / "dense", tmp_path / "small"
    assert run(*common, "-o", f32).exit_code == 0
    r = run(*common, "--export-dtype", "bfloat16", "-o", dense)
    assert r.exit_code == 0, r.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text((dense / "recipe.yaml").read_text())
    assert "dtype: bfloat16" in recipe.read_text()
    r = run("prune", "--model", model_dirs["llama"], "--recipe", recipe, "--format", "sparse-24-bitmask", "-o", small)
    assert r.exit_code == 0, r.output
    a, b, c = (json.loads((d / "report.json").read_text()) for d in (f32, dense, small))
    assert a["perplexity"] == b["perplexity"] == c["perplexity"]  # evaluated in float32 each time
    assert c["export"] == {"format": "sparse-24-bitmask", "weights_bytes": (small / "model.safetensors").stat().st_size,
                           "dtype": "bfloat16", "dense_bytes": b["export"]["weights_bytes"]}
    assert c["export"]["weights_bytes"] < c["export"]["dense_bytes"] < 0.55 * a["export"]["weights_bytes"]
    assert all(t.dtype == torch.bfloat16 for k, t in tensors(small / "model.safetensors").items() if "compressed" in k)
    assert same_weights(load(str(small))[0], AutoModelForCausalLM.from_pretrained(f32).to(torch.bfloat16))
    ratio = c["export"]["weights_bytes"] / c["export"]["dense_bytes"]
    assert f"(sparse-24-bitmask, bfloat16: {ratio:.2f}× a dense bfloat16 export)" in (small / "report.md").read_text()
    assert "(bfloat16) |" in (dense / "report.md").read_text()
    assert "MiB |  |" in next(ln for ln in (f32 / "report.md").read_text().splitlines() if "weights on disk" in ln)
    r = run(*common, "--export-dtype", "int8", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--export-dtype" in r.output


def test_cast_rows_equals_a_whole_tensor_cast(tmp_path):
    """cast_folder casts a tensor a slice of rows at a time (the file mapped only while a slice is read): the
    values equal a cast of the whole tensor, for every shape a model folder holds (2-D, 1-D, 0-D)."""
    from safetensors.torch import save_file

    from sparsellm.formats import _cast_rows

    torch.manual_seed(0)
    tensors = {"w": torch.randn(37, 5), "norm": torch.randn(7), "scale": torch.tensor(3.5), "e": torch.randn(3, 4, 5)}
    save_file(tensors, tmp_path / "x.safetensors")
    for dtype in (torch.bfloat16, torch.float16):
        for name, t in tensors.items():
            for chunk in (1, 11, 1 << 24):  # one row at a time (11 values: 2 rows of 5), a few rows, all at once
                got = _cast_rows(tmp_path / "x.safetensors", name, list(t.shape), dtype, chunk)
                assert got.dtype == dtype and torch.equal(got, t.to(dtype)), (name, chunk)
