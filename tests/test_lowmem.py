"""Low-memory mode (sparsellm/lowmem): the model is read and written one decoder layer at a time, and
its output is the in-memory path's, bit for bit; a model of a few GB is pruned in a fraction of its size."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEXT, tiny_model
from sparsellm import memory
from sparsellm.pipeline import RunOptions, compress
from sparsellm.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {
    "wanda": [{"prune": {"method": "wanda", "sparsity": 0.5}}],
    "sparsegpt": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}],
    "magnitude": [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
    "owl+wanda+dsnot": [{"allocate": {"method": "owl"}}, {"prune": {"method": "wanda", "sparsity": 0.6}},
                        {"refine": {"method": "dsnot"}}],
    # two passes that both modify: the second reads the first one's layers back from the output
    "sparsegpt-2:4-true-sequential+magnitude": [{"prune": {"method": "sparsegpt", "pattern": "2:4", "true_sequential": True}},
                                                {"prune": {"method": "magnitude", "sparsity": 0.7}}],
    # structured pruning is layer-local too: per-layer widths (with the runtime file) and a stock architecture
    # ECoFLaP's probes walk the later layers one at a time for all probes together
    "ecoflap+wanda": [{"allocate": {"method": "ecoflap", "nsamples": 2}}, {"prune": {"method": "wanda", "sparsity": 0.5}}],
    "cfsp-ffn+heads": [{"structure": {"method": "cfsp", "ffn": 0.5, "heads": 0.5, "round_to": 8}}],
    "wanda-sp-uniform+wanda": [{"structure": {"method": "wanda-sp", "ffn": 0.25, "uniform": True}},
                               {"prune": {"method": "wanda", "sparsity": 0.5}}],
}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer):
    """Tiny models saved in many small shards: Llama with tied embeddings (as SmolLM2), and OPT."""
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for name, model in (("llama-tied", tiny_model("llama", num_hidden_layers=3, tie_word_embeddings=True)),
                        ("opt", tiny_model("opt"))):
        model.save_pretrained(root / name, max_shard_size="40KB")
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def run(model: Path, stages, out: Path, low_memory: bool | None, ppl: bool = True, fmt: str = "dense",
        dtype: str = "auto", **options) -> dict:
    recipe = recipe_from_dict({"calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32},
                               "evaluation": {"ppl": [str(TEXT)] if ppl else [], "limit": 4}, "stages": stages,
                               "export": {"format": fmt, "dtype": dtype}})
    return compress(recipe, out, RunOptions(low_memory=low_memory, **options), str(model))


def assert_same_output(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "recipe.yaml"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f

    def code(folder):  # the runtime modeling file of per-layer shapes, when there is one
        return {p.name: p.read_bytes() for p in folder.glob("*.py")}

    assert code(a) == code(b)


@pytest.mark.parametrize("name", list(RECIPES))
def test_streamed_equals_in_memory(name, sharded, tmp_path):
    whole = run(sharded["llama-tied"], RECIPES[name], tmp_path / "whole", low_memory=False)
    low = run(sharded["llama-tied"], RECIPES[name], tmp_path / "low", low_memory=True)
    assert_same_output(tmp_path / "whole", tmp_path / "low")
    assert "lm_head.weight" not in tensors(tmp_path / "low")  # tied: stored once, as save_pretrained does
    # one shard per decoder layer plus one for the rest, with an index naming every tensor
    index = json.loads((tmp_path / "low" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors(tmp_path / "low"))
    assert len(list((tmp_path / "low").glob("model-*-of-00004.safetensors"))) == 4
    # perplexity computed layer by layer is the whole model's, bit for bit; so is the report's sparsity
    assert low["perplexity"] == whole["perplexity"] and low["perplexity"]["after"]
    assert low["sparsity"] == whole["sparsity"] and low["allocation"] == whole["allocation"]
    assert whole["low_memory"] is None and low["low_memory"]["reason"] == "requested (--low-memory)"


@pytest.mark.parametrize("fmt,stage", [("sparse-bitmask", {"method": "wanda", "sparsity": 0.5}),
                                       ("sparse-24-bitmask", {"method": "sparsegpt", "pattern": "2:4"})])
def test_streamed_bitmask_export_equals_in_memory(fmt, stage, sharded, tmp_path):
    """The low-memory output rewritten shard by shard into a bitmask format holds the in-memory export's
    compressed tensors and config, and loads back to the same weights."""
    from sparsellm import load

    whole = run(sharded["llama-tied"], [{"prune": stage}], tmp_path / "whole", low_memory=False, fmt=fmt)
    low = run(sharded["llama-tied"], [{"prune": stage}], tmp_path / "low", low_memory=True, fmt=fmt)
    assert_same_output(tmp_path / "whole", tmp_path / "low")
    assert any(k.endswith(".bitmask") for k in tensors(tmp_path / "low"))
    dense = low["export"].pop("dense_bytes")
    assert low["export"] == {"format": fmt, "weights_bytes": low["model"]["disk_bytes"], "dtype": "float32"}
    nbytes = sum(t.nbytes for t in tensors(sharded["llama-tied"]).values())  # the dense float32 tensors, headers aside
    assert nbytes < dense < nbytes + 2**16 and dense > low["export"]["weights_bytes"]
    assert low["perplexity"] == whole["perplexity"]
    a, b = (load(str(tmp_path / d))[0].state_dict() for d in ("whole", "low"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_equals_in_memory_opt(sharded, tmp_path):
    run(sharded["opt"], RECIPES["wanda"], tmp_path / "whole", low_memory=False, ppl=False)
    run(sharded["opt"], RECIPES["wanda"], tmp_path / "low", low_memory=True, ppl=False)
    assert_same_output(tmp_path / "whole", tmp_path / "low")


SLICES = {"per-layer": {"rotation": "per-layer"}, "per-layer-head": {"rotation": "per-layer", "slice_head": True},
          "uniform": {"rotation": "uniform"}, "uniform-tied": {"rotation": "uniform", "keep_tied": True}}


def offload_map(model_dir: Path) -> dict:
    """accelerate's device map that keeps decoder layer 0 (and modules without weights) in CPU memory and puts
    every other module, embeddings and head included, on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsellm.loading import get_adapter
    from sparsellm.loading.adapters import _get

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    adapter = get_adapter(model)
    paths = [p for p in (*adapter.pre_layer_paths, *adapter.head_paths) if _get(model, p) is not None]
    out = {p: "disk" if any(True for _ in _get(model, p).parameters()) else "cpu" for p in paths}
    out.update((adapter.layer_prefix(i), "cpu" if i == 0 else "disk") for i in range(cfg.num_hidden_layers))
    return out


@pytest.mark.parametrize("model,slicing,mode", [
    ("llama-tied", "per-layer", "low"), ("llama-tied", "uniform", "low"), ("llama-tied", "uniform-tied", "low"),
    ("opt", "per-layer-head", "low"), ("opt", "uniform", "low"),
    ("llama-tied", "per-layer", "offloaded"), ("llama-tied", "uniform", "offloaded"),
    ("llama-tied", "uniform-tied", "offloaded"), ("opt", "per-layer", "offloaded")])
def test_slicegpt_layer_by_layer_equals_in_memory(model, slicing, mode, sharded, tmp_path):
    """SliceGPT streamed from the shards (--low-memory) or offloaded by accelerate (--device-map), both
    rotations: the embeddings, the head (untied, the final norm fused in, new shape), the new per-layer
    shortcut matrices and the sliced config are the in-memory run's, bit for bit, as are the report's
    perplexity, sparsity, parameter counts and stage details; then a prune stage reads the sliced layers."""
    stages = [{"slice": {"method": "slicegpt", "slicing": 0.25, **SLICES[slicing]}}]
    if slicing == "per-layer":
        stages.append({"prune": {"method": "wanda", "sparsity": 0.5}})
    whole = run(sharded[model], stages, tmp_path / "whole", low_memory=False)
    options = ({"low_memory": True} if mode == "low" else
               {"low_memory": False, "device_map": json.dumps(offload_map(sharded[model])),
                "offload_folder": str(tmp_path / "offload")})
    other = run(sharded[model], stages, tmp_path / mode, **options)
    assert_same_output(tmp_path / "whole", tmp_path / mode)
    assert other["perplexity"] == whole["perplexity"] and other["sparsity"] == whole["sparsity"]
    for key in ("parameters_before", "parameters", "hidden_size", "sliced"):
        assert other["model"][key] == whole["model"][key], key
    assert [s["details"] for s in other["stages"]] == [s["details"] for s in whole["stages"]]
    assert whole["stages"][0]["details"]["hidden_size"] == [64, 48]
    cfg = json.loads((tmp_path / mode / "config.json").read_text())
    assert ("sparsellm_slicing" in cfg) == (model == "opt" or not slicing.startswith("uniform"))
    if mode == "offloaded":  # the sliced layers and head went where accelerate keeps them
        assert {"model.layers.1.self_attn.q_proj.weight.dat", "lm_head.weight.dat"} <= {
            f.name.replace("decoder.", "") for f in (tmp_path / "offload").iterdir()}
    if mode == "low":
        # the index names every tensor in the in-memory model's state_dict order, with the in-memory total size
        index = json.loads((tmp_path / "low" / "model.safetensors.index.json").read_text())
        from sparsellm import load

        ref = load(str(tmp_path / "whole"))[0]
        saved = [n for n in ref.state_dict() if n in tensors(tmp_path / "whole")]
        assert list(index["weight_map"]) == sorted(saved)  # written sorted, as save_pretrained does
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors(tmp_path / "whole").values())
        assert not list((tmp_path / "low").glob(".*"))  # the stash of changed embeddings and head is gone
        assert ("lm_head.weight" in index["weight_map"]) == (slicing != "uniform-tied")


def test_a_released_layer_keeps_no_loaded_tensor(sharded, tmp_path):
    """A stage that replaces a module of a layer (SliceGPT: a norm by one without weights) leaves the old
    module's tensors unreferenced by the layer; released, the stream holds none of the layer's tensors
    either: a memory-mapped tensor kept there holds its whole shard's pages (every layer stayed resident)."""
    from sparsellm.lowmem.stream import open_stream
    from sparsellm.lowmem.tensors import ShardWriter

    _, stream, _ = open_stream(str(sharded["llama-tied"]), "auto", False)
    stream.writer = ShardWriter(tmp_path, 5)
    layer = stream.model.model.layers[1]
    stream.load(1, layer)
    assert any(k.startswith("model.layers.1.") for k in stream.live)
    layer.input_layernorm = torch.nn.Identity()
    stream.release(1, layer)
    assert not any(k.startswith("model.layers.1.") for k in stream.live)
    assert "model.embed_tokens.weight" in stream.live  # the modules before the layers stay loaded
    assert "model.layers.1.input_layernorm.weight" not in json.dumps(stream.writer.weight_map)


def test_output_loads_with_transformers(sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    run(sharded["llama-tied"], RECIPES["wanda"], tmp_path / "low", low_memory=True, ppl=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "low")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == 0.5


def test_automatic_when_the_checkpoint_exceeds_available_memory(sharded, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    report = run(sharded["llama-tied"], RECIPES["magnitude"], tmp_path / "auto", low_memory=None, ppl=False)
    assert report["low_memory"]["reason"].startswith("automatic: the checkpoint (")
    assert "pruning it layer by layer from disk" in caplog.text
    # a recipe that needs the whole model loads it whole, and says why
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    report = run(sharded["llama-tied"], [{"learn": {"method": "maskllm", "prior": "none", "steps": 1, "batch_size": 2}}],
                 tmp_path / "whole", None, ppl=False)
    assert report["low_memory"] is None and "maskllm changes or trains the whole model at once" in caplog.text
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**12)
    assert run(sharded["llama-tied"], RECIPES["magnitude"], tmp_path / "big", None, ppl=False)["low_memory"] is None


def test_larger_than_memory_model_pruned_in_a_fraction_of_its_size(tmp_path):
    """A 2 GB random Llama (14 layers of 137 MB, float32) written shard by shard, pruned with Wanda in a
    child process: the child's peak RSS (its VmHWM, interpreter and libraries included) stays under half
    the model's size. Measured here: ~0.8 GB for 2.0 GB (README, Larger than memory)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import lowmem_memory

    r = lowmem_memory.main(["--size-gb", "2.0", "--workdir", str(tmp_path)])
    size, peak = r["model"]["bytes"], r["low_memory"]["peak_rss_bytes"]
    print(f"model {size / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB, "
          f"after loading {r['low_memory']['rss_after_load_bytes'] / 1e9:.2f} GB")
    assert size > 1.9e9
    assert peak < 0.5 * size
    assert r["low_memory"]["sparsity"] == 0.5


@pytest.mark.parametrize("name", ["owl+wanda+dsnot", "ecoflap+wanda", "cfsp-ffn+heads"])
def test_offloaded_layers_are_compressed_where_accelerate_keeps_them(name, sharded, tmp_path):
    """--device-map with layers offloaded to disk: the methods change the weights the hooks store, the
    output and perplexity equal the in-memory path's bit for bit, and so does the report's sparsity."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    recipe = recipe_from_dict({"calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32},
                               "evaluation": {"ppl": [str(TEXT)], "limit": 4}, "stages": RECIPES[name]})
    whole = compress(recipe, tmp_path / "whole", RunOptions(), str(sharded["llama-tied"]))
    options = RunOptions(device_map=json.dumps(device_map), offload_folder=str(tmp_path / "offload"))
    offloaded = compress(recipe, tmp_path / "offloaded", options, str(sharded["llama-tied"]))
    assert_same_output(tmp_path / "whole", tmp_path / "offloaded")
    assert offloaded["perplexity"] == whole["perplexity"] and offloaded["sparsity"] == whole["sparsity"]
    # the compressed weights went to the offload folder; the input checkpoint is untouched
    assert (tmp_path / "offload" / "model.layers.2.mlp.down_proj.weight.dat").is_file()
    assert not any(torch.equal(t, tensors(tmp_path / "whole")[n]) for n, t in tensors(sharded["llama-tied"]).items()
                   if n.endswith("layers.2.mlp.down_proj.weight"))


def test_eval_low_memory_gives_the_same_perplexity(sharded):
    from click.testing import CliRunner

    from sparsellm.cli import cli

    args = ["eval", "--model", str(sharded["llama-tied"]), "--ppl", str(TEXT), "--seqlen", "32", "--limit", "6", "--json"]
    whole = CliRunner().invoke(cli, args)
    low = CliRunner().invoke(cli, [*args, "--low-memory"])
    assert whole.exit_code == low.exit_code == 0, whole.output + low.output
    last = [json.loads(r.output.strip().splitlines()[-1]) for r in (whole, low)]
    assert last[0] == last[1] and last[0]["perplexity"][str(TEXT)] > 1


def test_export_dtype_is_applied_when_saving_in_every_memory_mode(sharded, tmp_path):
    """export.dtype bfloat16: in memory, streamed and offloaded, the same bfloat16 files, which are the float32
    run's weights cast; calibration and evaluation ran in float32 (the float32 run's perplexity and sparsity)."""
    model, stages = sharded["llama-tied"], [{"prune": {"method": "wanda", "sparsity": 0.5}}]
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    ref = run(model, stages, tmp_path / "f32", low_memory=False)
    runs = {"whole": run(model, stages, tmp_path / "whole", low_memory=False, dtype="bfloat16"),
            "low": run(model, stages, tmp_path / "low", low_memory=True, dtype="bfloat16"),
            "offloaded": run(model, stages, tmp_path / "offloaded", low_memory=False, dtype="bfloat16",
                             device_map=json.dumps(device_map), offload_folder=str(tmp_path / "offload"))}
    assert_same_output(tmp_path / "whole", tmp_path / "low")
    assert_same_output(tmp_path / "whole", tmp_path / "offloaded")
    t32, t16 = tensors(tmp_path / "f32"), tensors(tmp_path / "whole")
    assert sorted(t32) == sorted(t16)
    for name, t in t32.items():
        assert t16[name].dtype == torch.bfloat16 and torch.equal(t16[name], t.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    index = json.loads((tmp_path / "low" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in t16.values())
    assert ref["export"]["dtype"] == "float32" and ref["export"]["dense_bytes"] == ref["export"]["weights_bytes"]
    assert "dtype" not in (tmp_path / "f32" / "recipe.yaml").read_text()  # auto, the default, is not written
    assert "dtype: bfloat16" in (tmp_path / "whole" / "recipe.yaml").read_text()
    for name, r in runs.items():
        assert r["perplexity"] == ref["perplexity"] and r["sparsity"] == ref["sparsity"], name
        assert r["model"]["dtype"] == "float32", name  # what the run computed in
        assert r["export"]["dtype"] == "bfloat16" and r["export"]["dense_bytes"] == r["export"]["weights_bytes"], name
        assert r["export"]["weights_bytes"] < 0.55 * ref["export"]["weights_bytes"], name
