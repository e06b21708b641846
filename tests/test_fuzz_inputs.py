"""Fuzzing of every parser of untrusted input: GGUF headers and metadata, safetensors headers,
bitmask-compressed folders, config.json, recipe YAML (alias bombs included), checkpoint folders and
the mask files of `apply-masks`.

Seeded mutation loops (Hypothesis is not a dependency of this project): each test mutates a valid
file of its kind (bytes flipped, truncated, huge lengths and counts written over length fields, ranges
inserted or deleted, JSON values replaced), hands it to the parser and requires that it either accepts
it or raises the documented error for that input (its exit code, a message on one line), nothing else:
no MemoryError, no IndexError, no unbounded allocation (the Python heap is watched with tracemalloc
where the parser is pure Python, the process's peak RSS elsewhere). The counts keep the file to
seconds; raise FUZZ_SCALE to run more (FUZZ_SCALE=10 pytest tests/test_fuzz_inputs.py)."""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import struct
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import TEXT, tiny_model, write_gguf
from sparsellm.errors import (CheckpointError, CompressionError, ModelLoadError, RecipeError, SparseLLMError,
                              UnsupportedArchitectureError)

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
HUGE = (2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1)


def n(count: int) -> int:
    return max(1, int(count * SCALE))


def mutate(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    """One random damage of data[lo:hi] (the rest is kept): byte flips, a truncation, a huge 64- or 32-bit
    number over whatever is there (a length or count field, often), random bytes inserted, a range deleted."""
    hi = len(data) if hi is None else min(hi, len(data))
    if hi <= lo:  # nothing left to damage: add noise
        return data + rng.randbytes(rng.randint(1, 16))
    b = bytearray(data)
    at = rng.randrange(lo, max(lo + 1, hi))
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(lo, max(lo + 1, hi))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        return bytes(b[:at])
    elif kind == 2:
        b[at:at + 8] = struct.pack("<Q", rng.choice(HUGE + (rng.getrandbits(64),)))
    elif kind == 3:
        b[at:at + 4] = struct.pack("<I", rng.choice((0, 1, 7, 8, 9, 13, 255, 2**31, 2**32 - 1, rng.getrandbits(32))))
    elif kind == 4:
        b[at:at] = rng.randbytes(rng.randint(1, 64))
    else:
        del b[at:at + rng.randint(1, 64)]
    return bytes(b)


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, repr(text)
    return text


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def report(record_property, name: str, outcomes: Counter, t0: tuple[float, float]) -> None:
    """Case counts and time (wall and CPU), in the junit XML (record_property) and on stdout (-s)."""
    wall, cpu = time.perf_counter() - t0[0], time.process_time() - t0[1]
    record_property("cases", sum(outcomes.values()))
    record_property("seconds", round(wall, 2))
    print(f"\nfuzz {name}: {sum(outcomes.values())} cases in {wall:.1f} s ({cpu:.1f} s CPU): {dict(outcomes)}")


# -- GGUF --------------------------------------------------------------------------------------------

def test_gguf_headers(tmp_path, record_property):
    """check_gguf reads the whole header by hand; every mutation ends accepted or in exit 3 / 4."""
    from sparsellm.loading.models import check_gguf

    base = write_gguf(tmp_path / "base.gguf", "llama").read_bytes()
    header_end = base.index(b"token_embd.weight") + 64  # metadata and tensor table; the tensor data follows
    rng = random.Random(0)
    path = tmp_path / "f.gguf"
    outcomes, t0 = Counter(), clock()
    tracemalloc.start()
    try:
        for i in range(n(3000)):
            if i % 10 == 0:  # a valid magic, then noise
                data = b"GGUF" + (struct.pack("<I", 3) if i % 20 else b"") + rng.randbytes(rng.randint(0, 4096))
            else:
                data = mutate(base, rng, 4, header_end)
                for _ in range(rng.randrange(3)):
                    data = mutate(data, rng, 4, min(header_end, len(data)))
            path.write_bytes(data)
            try:
                check_gguf(path, "f.gguf")
                outcomes["accepted"] += 1
            except ModelLoadError as e:
                assert one_line(e).startswith("f.gguf is not a valid GGUF file (") and e.exit_code == 3
                outcomes["exit 3"] += 1
            except UnsupportedArchitectureError as e:  # a mutated architecture name
                assert "an architecture sparsellm does not support" in one_line(e) and e.exit_code == 4
                outcomes["exit 4"] += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # files of a few kB; lengths of up to 2^64 read from them
    assert outcomes["exit 3"] > 0.8 * sum(outcomes.values()) and outcomes["accepted"] > 0
    report(record_property, "gguf", outcomes, t0)


def test_gguf_accepted_mutants_load_or_fail_cleanly(tmp_path):
    """Mutants that pass the header check go on to transformers' GGUF loader: it must end in a
    documented error as well (this tiny file has no tokenizer, so none loads)."""
    from sparsellm.loading.models import check_gguf, load_model

    base = write_gguf(tmp_path / "base.gguf", "llama").read_bytes()
    rng = random.Random(1)
    path = tmp_path / "f.gguf"
    tried = 0
    while tried < n(3):
        data = mutate(base, rng, 4, base.index(b"token_embd.weight"))
        path.write_bytes(data)
        try:
            check_gguf(path, "f.gguf")
        except SparseLLMError:
            continue
        tried += 1
        with pytest.raises((ModelLoadError, UnsupportedArchitectureError)) as e:
            load_model(str(path))
        one_line(e.value)


# -- safetensors headers ----------------------------------------------------------------------------

def test_safetensors_headers(model_dirs, tmp_path, record_property):
    """A model folder whose model.safetensors header is damaged: load_model ends in exit 3 (or loads,
    when the damage left a valid file with the same tensors), and the process's peak RSS stays put."""
    from sparsellm.loading.models import load_model

    folder = Path(shutil.copytree(model_dirs["llama"], tmp_path / "m"))
    base = (folder / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", base[:8])[0]
    rng = random.Random(2)
    outcomes, t0 = Counter(), clock()
    rss0 = peak_rss_mib()
    for i in range(n(300)):
        if i % 6 == 0:  # the header length itself
            data = struct.pack("<Q", rng.choice(HUGE + (header_end + rng.randint(-50, 50),))) + base[8:]
        else:
            data = mutate(base, rng, 0, header_end)
        (folder / "model.safetensors").write_bytes(data)
        try:
            load_model(str(folder))
            outcomes["loaded"] += 1
        except ModelLoadError as e:
            one_line(e)
            outcomes["exit 3"] += 1
    assert peak_rss_mib() - rss0 < 512
    assert outcomes["exit 3"] > 0.8 * sum(outcomes.values())
    report(record_property, "safetensors", outcomes, t0)


# -- bitmask-compressed folders -------------------------------------------------------------------------

def _pruned_folder(tokenizer, path: Path, fmt: str) -> Path:
    from sparsellm.compress.masks import nm_mask
    from sparsellm.export import save_model

    model = tiny_model("llama")
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight[nm_mask(mod.weight.abs(), 2, 4)] = 0
    save_model(model, tokenizer, path, fmt)
    return path


def _damage_part(t: torch.Tensor, rng: random.Random) -> torch.Tensor | None:
    """A compressed-weight part replaced by something plausible and wrong (None: removed)."""
    kind = rng.randrange(9)
    if kind == 0:
        return None
    if kind == 1:  # shape values: huge, zero, negative, one more entry
        return torch.tensor(rng.choice([[2**40, 2**40], [0, 64], [-1, 64], [64, 64, 2], [2**31, 8], [64]]))
    if kind == 2:
        return t.flatten()[: max(0, t.numel() - rng.randint(1, 16))]
    if kind == 3:
        return torch.cat([t.flatten(), t.flatten()[:rng.randint(1, 16)]])
    if kind == 4:
        return t.float()
    if kind == 5:
        return t.to(torch.int64)
    if kind == 6 and t.dtype == torch.uint8:  # one more or one fewer kept weight
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] ^= 1 << rng.randrange(8)
        return t
    if kind == 7:
        return t.reshape(-1, 1) if t.dim() == 1 else t.t().contiguous()
    return torch.full_like(t, 2**30) if not t.is_floating_point() and t.dtype != torch.uint8 else t.flip(0)


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "sparse-24-bitmask"])
def test_bitmask_folders(fmt, tokenizer, tmp_path, record_property):
    """read_state_dict on a folder whose compressed tensors were replaced: exit 3 or the weights, never
    a dense tensor larger than the stored mask allows (the shape is checked against the bitmask first)."""
    from sparsellm.formats import read_state_dict

    folder = _pruned_folder(tokenizer, tmp_path / "p", fmt)
    good = load_file(folder / "model.safetensors")
    dense = read_state_dict(folder, fmt)
    parts = sorted(k for k in good if k.rpartition(".")[2] in ("shape", "compressed", "bitmask", "row_offsets"))
    rng = random.Random(3)
    outcomes, t0 = Counter(), clock()
    tracemalloc.start()  # numpy's unpackbits and the bitmask arrays are traced
    try:
        for i in range(n(150)):
            tensors = dict(good)
            for key in rng.sample(parts, rng.randint(1, 2)):
                bad = _damage_part(good[key], rng)
                if bad is None:
                    del tensors[key]
                else:
                    tensors[key] = bad.contiguous()
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
            try:
                got = read_state_dict(folder, fmt)
                assert {k: v.shape for k, v in got.items()}.keys() == dense.keys()
                outcomes["read"] += 1
            except ModelLoadError as e:
                assert str(folder) in one_line(e) and e.exit_code == 3
                outcomes["exit 3"] += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak
    assert outcomes["exit 3"] > 0.8 * sum(outcomes.values())
    report(record_property, f"bitmask {fmt}", outcomes, t0)


# -- config.json ---------------------------------------------------------------------------------------

JUNK = [None, True, -1, 0, 2**40, 2**63, 1.5, float("nan"), "x", "", [], [1, 2], {}, {"a": 1}]


def test_config_json(model_dirs, tmp_path, record_property):
    """config.json with a value replaced, a key removed, or damaged bytes: load_model ends in exit 3 or
    4, or loads a model; no exception of another kind, no allocation the weights do not justify (a layer
    count or size of 2^40 is refused before transformers builds anything)."""
    from sparsellm.loading.models import load_model

    folder = Path(shutil.copytree(model_dirs["llama"], tmp_path / "m"))
    base = json.loads((folder / "config.json").read_text())
    keys = sorted(base)
    rng = random.Random(4)
    outcomes, t0 = Counter(), clock()
    rss0 = peak_rss_mib()
    for i in range(n(200)):
        if i % 8 == 7:
            raw = mutate(json.dumps(base).encode(), rng)
        else:
            cfg = dict(base)
            for _ in range(rng.randint(1, 2)):
                key = rng.choice(keys)
                if rng.random() < 0.15:
                    cfg.pop(key, None)
                else:
                    cfg[key] = rng.choice(JUNK)
            raw = json.dumps(cfg).encode()
        (folder / "config.json").write_bytes(raw)
        try:
            load_model(str(folder))
            outcomes["loaded"] += 1
        except (ModelLoadError, UnsupportedArchitectureError) as e:
            one_line(e)
            outcomes[f"exit {e.exit_code}"] += 1
    assert peak_rss_mib() - rss0 < 512
    assert outcomes["loaded"] > 0 and outcomes["exit 3"] > 0
    report(record_property, "config.json", outcomes, t0)


# -- recipe YAML ---------------------------------------------------------------------------------------

RECIPE = f"""seed: 0
calibration: {{dataset: {TEXT}, nsamples: 4, seqlen: 32}}
evaluation: {{ppl: [{TEXT}], limit: 2}}
stages:
  - allocate: {{method: owl, lambda: 0.08}}
  - prune: {{method: wanda, sparsity: 0.5, targets: ["*.mlp.*"], ignore: []}}
  - refine: {{method: dsnot, max_cycles: 5}}
export: {{format: dense}}
"""
YAML_SNIPPETS = ["&a", "*a", "*b", "<<: *a", "[", "]", "{", "}", "- ", ": ", "\n  ", "'", '"', "!!python/object:os.system",
                 "!!binary", "%YAML 1.1\n", "---\n", "...", "? ", "|", ">", "#", "\t", "\x00", "\ud800", "1e999", "0x1F",
                 "~", "null", "&b [*a, *a, *a, *a]"]


def _alias_bomb(rng: random.Random) -> str:
    levels, fan = rng.randint(3, 12), rng.randint(2, 12)
    lines = [f"x0: &x0 {rng.choice(['lol', '[1, 2]', '{k: v}'])}"]
    lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * fan)}]" for i in range(1, levels)]
    if rng.random() < 0.5:
        lines.append(f"stages: *x{levels - 1}")
    else:  # merge keys expand too
        lines = [f"x0: &x0 {{a: 1, b: 2}}"] + [f"x{i}: &x{i} {{<<: *x{i - 1}, k{i}: [{', '.join([f'*x{i - 1}'] * fan)}]}}"
                                                for i in range(1, levels)] + [f"seed: *x{levels - 1}"]
    return "\n".join(lines) + "\n"


def test_recipe_yaml(tmp_path, record_property):
    """load_recipe on mutated recipes, YAML syntax dropped in at random, and random alias bombs (up to
    12 levels of 12 aliases, 12^11 values): a Recipe or a one-line RecipeError (exit 2), quickly and in
    bounded memory."""
    from sparsellm.recipe import load_recipe

    load_recipe_path = tmp_path / "r.yaml"
    rng = random.Random(5)
    outcomes, t0 = Counter(), clock()
    slowest = 0.0
    tracemalloc.start()
    try:
        for i in range(n(800)):
            if i % 10 == 0:
                text = _alias_bomb(rng)
            elif i % 3 == 0:
                text = RECIPE
                for _ in range(rng.randint(1, 4)):
                    at = rng.randrange(len(text))
                    text = text[:at] + rng.choice(YAML_SNIPPETS) + text[at + rng.randrange(3):]
            else:
                text = mutate(RECIPE.encode(), rng).decode("utf-8", "replace")
            load_recipe_path.write_text(text, encoding="utf-8", errors="surrogatepass")
            t = time.process_time()
            try:
                load_recipe(load_recipe_path)
                outcomes["valid"] += 1
            except RecipeError as e:
                assert one_line(e).startswith(("recipe ", "invalid recipe ", "cannot read recipe ")) and e.exit_code == 2
                outcomes["exit 2"] += 1
            slowest = max(slowest, time.process_time() - t)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak
    assert slowest < 5, slowest
    assert outcomes["valid"] > 0 and outcomes["exit 2"] > 0.5 * sum(outcomes.values())
    report(record_property, "recipe yaml", outcomes, t0)


def test_safe_yaml_counts_the_expanded_tree():
    from sparsellm.safe_yaml import MAX_NODES, expanded_size, flow_depth, load

    node = yaml.compose("a: &a [1, 2, 3]\nb: [*a, *a]\n", Loader=yaml.SafeLoader)
    # mapping 1 + key a 1 + [1,2,3] 4 + key b 1 + [*a, *a] (1 + 2 * 4) = 16
    assert expanded_size(node) == 16
    assert load("a: &a [1, 2]\nb: [*a, *a]\n") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
    assert MAX_NODES >= 100_000  # room for long target lists
    assert load("a: [1, 2, 3, 4]\n", max_nodes=7) == {"a": [1, 2, 3, 4]}  # mapping, key, list and 4 items: 7
    with pytest.raises(yaml.YAMLError, match="expand to more than 6 values"):
        load("a: [1, 2, 3, 4]\n", max_nodes=6)
    assert flow_depth("a: [1, {b: '[[[', c: \"]]\\\"[\"}] # [[[[\n") == 2
    assert flow_depth("k: it's [fine]\n") == 1


# -- checkpoint folders ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interrupted_checkpoint(tmp_path_factory, tokenizer):
    """A real checkpoint of a Wanda + DSnoT run on a 4-layer tiny Llama, stopped after layer 1."""
    from click.testing import CliRunner

    from sparsellm.cli import cli

    root = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama", num_hidden_layers=4).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({"seed": 0, "calibration": {"dataset": str(TEXT), "nsamples": 4, "seqlen": 32},
                                      "stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"refine": {"method": "dsnot"}}]}))
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSELLM_TEST_KILL_AT", "layer:1")
    mp.setenv("SPARSELLM_TEST_SIGNAL", "INT")
    try:
        r = CliRunner().invoke(cli, ["prune", "--model", str(root / "model"), "--recipe", str(recipe),
                                     "-o", str(root / "out"), "--checkpoint-dir", str(root / "ck")])
    finally:
        mp.undo()
    assert r.exit_code == 130, r.output
    return root


def _resume(root: Path, ck: Path):
    """What a resumed run does with a checkpoint folder before compressing anything: open it with the
    run's fingerprint, restore the finished layers and the methods' state, read the saved inputs."""
    from sparsellm.checkpoint import Checkpoint, fingerprint
    from sparsellm.compress import build_method
    from sparsellm.loading import get_adapter, load_model
    from sparsellm.recipe import load_recipe

    loaded = load_model(str(root / "model"))
    recipe = load_recipe(root / "r.yaml")
    from sparsellm.data import calibration_windows

    windows = calibration_windows(loaded.tokenizer, str(TEXT), 4, 32, 0)
    c = Checkpoint(ck, fingerprint(sorted(loaded.model.state_dict().items()), recipe, windows), resume=True)
    layers = get_adapter(loaded.model).layers(loaded.model)
    methods = [build_method(s.spec) for s in recipe.stages]
    done = c.restore("stage0", layers, methods)
    if done:
        c.inputs("stage0", done, "cpu")
    return done


def test_checkpoint_folders(interrupted_checkpoint, tmp_path, record_property):
    """A checkpoint whose state.json or layer files were damaged: resuming ends in exit 9 (or resumes,
    when the damage changed nothing that matters), never in another exception."""
    root = interrupted_checkpoint
    assert _resume(root, Path(shutil.copytree(root / "ck", tmp_path / "intact"))) == 2
    files = sorted(p.name for p in (root / "ck").iterdir())
    assert "state.json" in files and "stage0-layer1.safetensors" in files
    state = json.loads((root / "ck" / "state.json").read_text())
    rng = random.Random(6)
    outcomes, t0 = Counter(), clock()
    for i in range(n(60)):
        ck = tmp_path / f"c{i}"
        shutil.copytree(root / "ck", ck)
        target = rng.choice(files)
        if target == "state.json" and i % 2:  # structurally wrong values
            s = json.loads(json.dumps(state))
            where = rng.choice([("passes",), ("passes", "stage0"), ("passes", "stage0", "layers_done"),
                                ("passes", "stage0", "methods"), ("fingerprint",), ("results",), ("format",)])
            d = s
            for k in where[:-1]:
                d = d[k]
            d[where[-1]] = rng.choice(JUNK + [99, -5, [{}], [{"rows": "x"}]])
            (ck / target).write_text(json.dumps(s))
        else:
            data = (ck / target).read_bytes()
            (ck / target).write_bytes(mutate(data, rng, 0, min(len(data), 4096) if rng.random() < 0.7 else None))
        try:
            _resume(root, ck)
            outcomes["resumed"] += 1
        except CheckpointError as e:
            assert str(ck) in one_line(e) and e.exit_code == 9
            outcomes["exit 9"] += 1
        shutil.rmtree(ck)
    assert outcomes["exit 9"] > 0.5 * sum(outcomes.values())
    report(record_property, "checkpoint", outcomes, t0)


# -- mask files for apply-masks --------------------------------------------------------------------------

def test_mask_files(tmp_path, record_property):
    """A masks.safetensors damaged in its header, its metadata or its bits: load_masks ends in exit 2 and
    apply_masks in exit 7, or the masks apply; the shapes in the metadata never size an allocation."""
    from sparsellm.compress.maskllm import apply_masks, load_masks, save_masks

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    keep = {name: torch.rand(mod.weight.shape, generator=gen) > 0.5 for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".layers." in name}
    path = tmp_path / "masks.safetensors"
    save_masks(keep, path, "2:4", "llama")
    base = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", base[:8])[0]
    meta = json.loads(json.loads(base[8:header_end])["__metadata__"]["sparsellm"])
    rng = random.Random(7)
    outcomes, t0 = Counter(), clock()
    tracemalloc.start()
    try:
        for i in range(n(600)):
            if i % 3 == 0:  # the metadata: shapes, names, format
                m = json.loads(json.dumps(meta))
                name = rng.choice(sorted(m["shapes"]))
                choice = rng.randrange(5)
                if choice == 0:
                    m["shapes"][name] = rng.choice([[2**40, 2**40], [0, 0], [-1, 8], [1], "64x64", None, [2**31, 2]])
                elif choice == 1:
                    m["shapes"]["model.layers.9.mlp.up_proj"] = [128, 64]
                elif choice == 2:
                    m["shapes"] = rng.choice(JUNK)
                elif choice == 3:
                    m["format"] = rng.choice(JUNK)
                else:
                    m = rng.choice(JUNK)
                tensors = {f"{k}.mask": v for k, v in _packed(keep).items()}
                save_file(tensors, str(path), metadata={"sparsellm": json.dumps(m)})
            else:
                path.write_bytes(mutate(base, rng, 0, header_end if rng.random() < 0.5 else None))
            try:
                got, _ = load_masks(path)
                try:
                    apply_masks(model, got)
                    outcomes["applied"] += 1
                except CompressionError as e:
                    assert one_line(e) and e.exit_code == 7
                    outcomes["exit 7"] += 1
            except RecipeError as e:
                assert str(path) in one_line(e) and e.exit_code == 2
                outcomes["exit 2"] += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak
    assert outcomes["exit 2"] > 0.5 * sum(outcomes.values())
    report(record_property, "mask files", outcomes, t0)


def _packed(keep: dict) -> dict:
    from sparsellm.formats import pack_bitmask

    return {name: pack_bitmask(m) for name, m in keep.items()}
