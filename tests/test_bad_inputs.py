"""The bad-input matrix: every way a user can get `sparsellm` wrong that we know of, one test each.

Each case must end with exactly one line `error: <problem>; <fix>` (compared whole, below), its
documented exit code, no traceback, and nothing left behind: the test folder holds the same files
after the run as before it (the checkpoint of an interrupted run, kept on purpose for --resume, is
the one exception a case may declare). Run with `--junitxml=FILE` to collect the messages: each test
records its line as the property `message`."""
from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import TEXT, cli_process, tiny_model, write_gguf
from sparsellm.cli import cli

SUPPORTED = "llama, mistral, qwen2, opt, qwen3, smollm3, gemma2, gemma3_text, phi3, olmo2, granite, mixtral, qwen2_moe, qwen3_moe"
MAGNITUDE = ["--method", "magnitude", "--sparsity", "0.5"]  # data-free: the quickest complete run
WANDA = ["--method", "wanda", "--sparsity", "0.5", "--calib", TEXT, "--nsamples", 2, "--seqlen", 16]
RECIPE_FIX = "fix that field (see 'Recipe reference' in README.md)"


@dataclass
class Case:
    args: list
    code: int
    message: str  # the whole error line after "error: "; {tmp} stands for the test's folder
    process: dict | None = None  # run in a child process with these environment variables (signals)
    keeps: list[str] = field(default_factory=list)  # files the run may leave on purpose, relative to {tmp}


@dataclass
class Workspace:
    tmp: Path
    models: dict
    tokenizer: object
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def model(self, arch: str = "llama") -> Path:
        """A copy of a tiny model folder to damage."""
        return Path(shutil.copytree(self.models[arch], self.tmp / "model"))

    def pickle_only_model(self) -> Path:
        """A copy of the tiny Llama with its weights in pytorch_model.bin instead of safetensors."""
        from safetensors.torch import load_file

        d = self.model()
        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
        return d

    def recipe(self, stage: dict | None = None, **top) -> Path:
        data = {"calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16},
                "stages": [{"prune": stage or {"method": "wanda", "sparsity": 0.5}}], **top}
        path = self.tmp / "r.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def prune(self, *args) -> list:
        return ["prune", "--model", self.models["llama"], *args, "--output", self.out]

    def as_if_not_root(self, module, name: str, bits: int) -> None:
        """root reads and writes whatever the permission bits say; judge by the bits, as for a user."""
        if os.geteuid() == 0:
            self.monkeypatch.setattr(module, name, lambda p: bool(Path(p).stat().st_mode & bits))

    def interrupted_checkpoint(self, *args) -> Path:
        """A real checkpoint: an in-process run stopped by SIGINT after its first layer."""
        ckpt = self.tmp / "ckpt"
        self.monkeypatch.setenv("SPARSELLM_TEST_KILL_AT", "layer:0")
        self.monkeypatch.setenv("SPARSELLM_TEST_SIGNAL", "INT")
        r = CliRunner().invoke(cli, [str(a) for a in self.prune(*args, "--checkpoint-dir", ckpt)])
        assert r.exit_code == 130, r.output
        self.monkeypatch.delenv("SPARSELLM_TEST_KILL_AT")
        return ckpt


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# -- the model -------------------------------------------------------------------------------------
@case
def model_path_missing(w):
    return Case(["prune", "--model", w.tmp / "nothing", *MAGNITUDE, "-o", w.out], 3,
                "model path not found: {tmp}/nothing; check the path, or give a hub id like org/name")


@case
def model_path_unreadable(w):
    import sparsellm.loading.models as models

    d = w.model()
    d.chmod(0o000)
    w.as_if_not_root(models, "_readable", 0o444)
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 3,
                "model {tmp}/model is not readable (permission denied on {tmp}/model); "
                "fix its permissions (chmod -R u+rX) or run as a user who can read it")


@case
def model_path_is_a_file(w):
    (w.tmp / "weights.bin").write_bytes(b"\0" * 16)
    return Case(["prune", "--model", w.tmp / "weights.bin", *MAGNITUDE, "-o", w.out], 3,
                "model path {tmp}/weights.bin is a file, not a model folder or .gguf file; "
                "give the folder that holds config.json")


@case
def model_folder_without_config(w):
    d = w.model()
    (d / "config.json").unlink()
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 3,
                "no config.json in model folder {tmp}/model; give a complete Hugging Face model folder "
                "(config.json + *.safetensors)")


@case
def hub_unreachable_offline(w):
    import huggingface_hub.constants

    # offline mode: the hub client fails at once instead of waiting for a network timeout
    w.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    w.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return Case(["prune", "--model", "sparsellm-tests/no-such-model", *MAGNITUDE, "-o", w.out], 3,
                "cannot download 'sparsellm-tests/no-such-model': the hub is unreachable (offline or HF_HUB_OFFLINE=1) "
                "and it is not in the local cache; connect to the network once, or give a local model folder or .gguf file")


@case
def unsupported_architecture(w):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = w.tmp / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(d)
    w.tokenizer.save_pretrained(d)
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 4,
                f"unsupported architecture 'gpt2'; use a model of a supported architecture: {SUPPORTED}")


@case
def corrupt_safetensors(w):
    d = w.model()
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 3,
                "model weights of {tmp}/model are corrupt or truncated (Error while deserializing header: "
                "incomplete metadata, file not fully covered); re-download or re-export the model")


@case
def corrupt_config(w):
    d = w.model()
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 3,
                "config.json of {tmp}/model is not valid JSON; fix or re-download the file")


@case
def gguf_unsupported_architecture(w):
    # RWKV-6: a real llama.cpp architecture that transformers cannot read from GGUF, nor we prune
    path = write_gguf(w.tmp / "tiny-rwkv6.gguf", "rwkv6")
    return Case(["prune", "--model", path, *MAGNITUDE, "-o", w.out], 4,
                "GGUF file {tmp}/tiny-rwkv6.gguf holds a 'rwkv6' model, an architecture sparsellm does not support; "
                f"use a model of a supported architecture: {SUPPORTED}")


@case
def gguf_truncated(w):
    path = write_gguf(w.tmp / "tiny.gguf", "llama")
    path.write_bytes(path.read_bytes()[:20])
    return Case(["prune", "--model", path, *MAGNITUDE, "-o", w.out], 3,
                "{tmp}/tiny.gguf is not a valid GGUF file (file ends inside the header); re-download or re-convert it")


@case
def gguf_random_bytes_after_magic(w):
    import random

    path = w.tmp / "noise.gguf"
    path.write_bytes(b"GGUF" + random.Random(0).randbytes(4096))
    return Case(["prune", "--model", path, *MAGNITUDE, "-o", w.out], 3,
                "{tmp}/noise.gguf is not a valid GGUF file (unknown GGUF version 3626764237); re-download or re-convert it")


@case
def gguf_random_bytes_after_version(w):
    import random
    import struct

    path = w.tmp / "noise.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + random.Random(0).randbytes(4096))
    return Case(["prune", "--model", path, *MAGNITUDE, "-o", w.out], 3,
                "{tmp}/noise.gguf is not a valid GGUF file (16,422,101,724,900,707,500 metadata entries and "
                "7,106,521,602,475,165,645 tensors cannot fit in 4,104 bytes); re-download or re-convert it")


@case
def gguf_key_length_2_to_the_40(w):
    import struct

    path = write_gguf(w.tmp / "tiny.gguf", "llama")
    data = path.read_bytes()  # magic, version, tensor count, metadata count, then the first key's length
    path.write_bytes(data[:24] + struct.pack("<Q", 2**40) + data[32:])
    return Case(["prune", "--model", path, *MAGNITUDE, "-o", w.out], 3,
                "{tmp}/tiny.gguf is not a valid GGUF file (key of 1,099,511,627,776 bytes runs past the end of the "
                "file); re-download or re-convert it")


@case
def missing_tensor_in_memory(w):
    # transformers would fill the missing weight with random values and only warn
    from safetensors.torch import load_file, save_file

    d = w.model()
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 3,
                "tensor model.layers.1.mlp.up_proj.weight is missing from the weights of {tmp}/model; the checkpoint "
                "is incomplete: re-download or re-export it")


@case
def config_layer_count_beyond_the_weights(w):
    import json

    d = w.model()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2 * 10**8}))
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 3,
                "config.json of {tmp}/model has num_hidden_layers 200000000, but its weights hold only 21 tensors; "
                "fix config.json or re-download the model")


@case
def config_zero_heads(w):
    import json

    d = w.model()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 0}))
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 3,
                "config.json of {tmp}/model is invalid (ZeroDivisionError: integer modulo by zero); fix it or "
                "re-download the model")


@case
def config_sizes_not_those_of_the_weights(w):
    import json

    d = w.model()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 10**9}))  # 256 GB if it were allocated
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 3,
                "the weights of {tmp}/model do not have the shapes its config says; fix config.json or re-download "
                "or re-export the model")


@case
def pickle_weights_refused(w):
    d = w.pickle_only_model()
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", w.out], 3,
                "model folder {tmp}/model has only pickle weights (pytorch_model.bin), which can run code when loaded; "
                "pass --allow-pickle if you trust their source, or convert them to safetensors")


# -- the recipe and options --------------------------------------------------------------------------
@case
def recipe_missing(w):
    return Case(w.prune("--recipe", w.tmp / "missing.yaml"), 2,
                "recipe file not found: {tmp}/missing.yaml; check the path (ready recipes are in recipes/)")


@case
def recipe_yaml_syntax_error(w):
    (w.tmp / "r.yaml").write_text("stages:\n  - prune: {method: wanda, sparsity: 0.5\n")
    return Case(w.prune("--recipe", w.tmp / "r.yaml"), 2,
                "recipe {tmp}/r.yaml is not valid YAML at line 3, column 1: expected ',' or '}', but got "
                "'<stream end>'; fix the syntax there")


@case
def recipe_alias_bomb(w):
    # "billion laughs": 9 levels of 9 aliases each, 9^9 values once expanded, from 600 bytes
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (w.tmp / "r.yaml").write_text("\n".join(lines + ["stages: *a9"]) + "\n")
    return Case(w.prune("--recipe", w.tmp / "r.yaml"), 2,
                "recipe {tmp}/r.yaml is not valid YAML: its anchors and aliases expand to more than 100,000 values; "
                "fix the syntax there")


@case
def recipe_nested_too_deep(w):
    (w.tmp / "r.yaml").write_text("stages: " + "[" * 5000 + "]" * 5000 + "\n")
    return Case(w.prune("--recipe", w.tmp / "r.yaml"), 2,
                "recipe {tmp}/r.yaml is not valid YAML: it nests brackets more than 64 levels deep; fix the syntax there")


@case
def recipe_unknown_key(w):
    return Case(w.prune("--recipe", w.recipe({"method": "wanda", "sparsity": 0.5, "colour": 1})), 2,
                f"invalid recipe ({{tmp}}/r.yaml): stages.0.prune.wanda.colour: unknown key; {RECIPE_FIX}")


@case
def recipe_unknown_top_level_key(w):
    return Case(w.prune("--recipe", w.recipe(extra=1)), 2,
                f"invalid recipe ({{tmp}}/r.yaml): extra: unknown key; {RECIPE_FIX}")


@case
def recipe_wrong_type(w):
    return Case(w.prune("--recipe", w.recipe({"method": "wanda", "sparsity": "half"})), 2,
                "invalid recipe ({tmp}/r.yaml): stages.0.prune.wanda.sparsity: Input should be a valid number, "
                f"unable to parse string as a number (got 'half'); {RECIPE_FIX}")


@case
def recipe_unknown_method(w):
    return Case(w.prune("--recipe", w.recipe({"method": "obs", "sparsity": 0.5})), 2,
                "invalid recipe ({tmp}/r.yaml): stages.0.prune: Input tag 'obs' found using 'method' does not match "
                f"any of the expected tags: 'magnitude', 'wanda', 'sparsegpt'; {RECIPE_FIX}")


@case
def sparsity_negative(w):
    return Case(w.prune("--recipe", w.recipe({"method": "wanda", "sparsity": -0.1})), 2,
                "invalid recipe ({tmp}/r.yaml): stages.0.prune.wanda.sparsity: Input should be greater than or equal "
                f"to 0 (got -0.1); {RECIPE_FIX}")


@case
def sparsity_one(w):
    return Case(w.prune(*WANDA[:2], "--sparsity", "1.0"), 2,
                "invalid recipe (command line): stages.0.prune.wanda.sparsity: Input should be less than 1 (got 1.0); "
                "fix that option (see sparsellm prune --help)")


@case
def sparsity_missing(w):
    return Case(w.prune("--recipe", w.recipe({"method": "wanda"})), 2,
                f"invalid recipe ({{tmp}}/r.yaml): stages.0.prune.wanda: sparsity is required for unstructured pruning; {RECIPE_FIX}")


@case
def sparsity_contradicts_pattern(w):
    return Case(w.prune("--recipe", w.recipe({"method": "wanda", "sparsity": 0.3, "pattern": "2:4"})), 2,
                "invalid recipe ({tmp}/r.yaml): stages.0.prune.wanda: sparsity 0.3 contradicts pattern 2:4 (= 0.5); "
                f"{RECIPE_FIX}")


@case
def nm_with_n_not_below_m(w):
    return Case(w.prune("--recipe", w.recipe({"method": "wanda", "pattern": "4:2"})), 2,
                f"invalid recipe ({{tmp}}/r.yaml): stages.0.prune.wanda.pattern: N:M needs 0 < N < M (got '4:2'); {RECIPE_FIX}")


@case
def nm_malformed(w):
    return Case(w.prune("--recipe", w.recipe({"method": "wanda", "pattern": "2-4"})), 2,
                'invalid recipe ({tmp}/r.yaml): stages.0.prune.wanda.pattern: must be "unstructured" or "N:M" like '
                f'"2:4" (got \'2-4\'); {RECIPE_FIX}')


@case
def nm_m_not_dividing_width(w):
    return Case(w.prune("--method", "wanda", "--pattern", "3:7", "--calib", TEXT), 2,
                "pattern 3:7: M=7 does not divide the input width 64 of model.layers.0.self_attn.q_proj; use an M that "
                "divides every targeted layer's width (2:4, 4:8), or ignore that layer")


@case
def unknown_option(w):
    return Case(w.prune(*MAGNITUDE, "--sparsty", "0.5"), 2,
                "No such option '--sparsty'. (Did you mean one of: '--sparsity', '--task-path'?); see sparsellm prune --help")


@case
def nsamples_zero(w):
    return Case(w.prune(*WANDA, "--nsamples", 0), 2,
                "--nsamples must be a positive integer, got 0; give a number of at least 1")


@case
def seqlen_negative(w):
    return Case(w.prune("--recipe", w.recipe(calibration={"dataset": str(TEXT), "seqlen": -5})), 2,
                f"invalid recipe ({{tmp}}/r.yaml): calibration.seqlen: Input should be greater than 0 (got -5); {RECIPE_FIX}")


@case
def seqlen_beyond_context(w):
    return Case(w.prune(*WANDA, "--seqlen", 512), 2,
                "seqlen 512 exceeds the model's context of 256 tokens; use a seqlen of at most 256")


@case
def cuda_not_available(w):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return Case(w.prune(*MAGNITUDE, "--device", "cuda"), 2,
                "device 'cuda' requested but CUDA is not available on this machine; use --device cpu")


@case
def resume_without_checkpoint_dir(w):
    return Case(w.prune(*WANDA, "--resume"), 2,
                "--resume needs --checkpoint-dir DIR, the folder the interrupted run saved its progress to")


# -- the data -----------------------------------------------------------------------------------------
@case
def calibration_file_missing(w):
    return Case(w.prune(*WANDA, "--calib", w.tmp / "nope.txt"), 2,
                "invalid recipe (command line): calibration.dataset: not wikitext2, c4, hf:ORG/NAME[:CONFIG[:SPLIT[:FIELD]]], "
                "or an existing file "
                "(got '{tmp}/nope.txt'); fix that option (see sparsellm prune --help)")


@case
def calibration_text_empty(w):
    (w.tmp / "empty.txt").write_text("\n \n\n")
    return Case(w.prune(*WANDA, "--calib", w.tmp / "empty.txt"), 5,
                "{tmp}/empty.txt contains no text; give a file with the documents to calibrate or evaluate on")


@case
def calibration_text_too_short(w):
    (w.tmp / "short.txt").write_text("The cat sat on the mat.\n")
    return Case(w.prune(*WANDA, "--calib", w.tmp / "short.txt"), 5,
                "calibration text {tmp}/short.txt has 11 tokens, too few for windows of 16; give more than 17 tokens "
                "of text, or a smaller --seqlen")


@case
def calibration_text_not_utf8(w):
    (w.tmp / "latin1.txt").write_bytes("Les élèves arrivent à l'école.\n".encode("latin-1"))
    return Case(w.prune(*WANDA, "--calib", w.tmp / "latin1.txt"), 5,
                "{tmp}/latin1.txt is not UTF-8 text (invalid byte at offset 4); convert it to UTF-8, e.g. iconv -f latin1 "
                "-t utf-8")


# -- the output ---------------------------------------------------------------------------------------
@case
def output_exists(w):
    w.out.mkdir()
    (w.out / "model.safetensors").write_bytes(b"an earlier result")
    return Case(w.prune(*MAGNITUDE), 6, "output folder {tmp}/out already exists; pass --overwrite to replace it")


@case
def output_is_a_file(w):
    w.out.write_text("notes")
    return Case(w.prune(*MAGNITUDE), 6, "output path {tmp}/out is a file; choose a folder path")


@case
def output_parent_is_a_file(w):
    (w.tmp / "f").write_text("notes")
    return Case(["prune", "--model", w.models["llama"], *MAGNITUDE, "-o", w.tmp / "f" / "out"], 6,
                "cannot create the output folder: {tmp}/f is a file; choose another --output")


@case
def output_not_writable(w):
    import sparsellm.export as export

    ro = w.tmp / "ro"
    ro.mkdir(mode=0o555)
    w.as_if_not_root(export, "_writable", 0o222)
    return Case(["prune", "--model", w.models["llama"], *MAGNITUDE, "-o", ro / "out"], 6,
                "folder {tmp}/ro is not writable; choose another --output")


@case
def disk_full_while_writing_output(w):
    import sparsellm.handle as handle

    def full_disk(model, tokenizer, folder, fmt="dense", dtype=None):
        (folder / "model.safetensors").write_bytes(b"the first half")
        raise OSError(errno.ENOSPC, "No space left on device")

    w.monkeypatch.setattr(handle, "save_model", full_disk)
    return Case(w.prune(*MAGNITUDE), 6, "no space left on the device while writing {tmp}/out; free space and run again")


@case
def disk_full_while_writing_checkpoint(w):
    import sparsellm.checkpoint as checkpoint

    def full_disk(tensors, path):
        Path(path).write_bytes(b"the first half")
        raise OSError(errno.ENOSPC, "No space left on device")

    w.monkeypatch.setattr(checkpoint, "save_file", full_disk)
    # the checkpoint folder and its (empty) commit record stay: resumable once there is space
    return Case(w.prune(*WANDA, "--checkpoint-dir", w.tmp / "ckpt"), 6,
                "no space left on the device while writing the checkpoint in {tmp}/ckpt; free space and run again "
                "with --resume", keeps=["ckpt", "ckpt/state.json"])


# -- during the run -----------------------------------------------------------------------------------
@case
def nan_during_calibration(w):
    # activations of 1e5 in layer 0's MLP: fine in float32, inf in the float16 the checkpoint is stored in
    model = tiny_model("llama")
    with torch.no_grad():
        for proj in (model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj):
            proj.weight.mul_(100)
    d = w.tmp / "fp16"
    model.half().save_pretrained(d)
    w.tokenizer.save_pretrained(d)
    return Case(["prune", "--model", d, *WANDA, "-o", w.out], 8,
                "non-finite values (NaN/inf) in the calibration inputs of model.layers.0.mlp.down_proj; "
                "the model overflows in float16: load it in float32 (--dtype float32)")


@case
def interrupted(w):
    return Case(w.prune(*WANDA), 130, "interrupted; no output was written",
                process={"SPARSELLM_TEST_KILL_AT": "stats:0", "SPARSELLM_TEST_SIGNAL": "INT"})


@case
def interrupted_with_checkpoint(w):
    return Case(w.prune(*WANDA, "--checkpoint-dir", w.tmp / "ckpt"), 130,
                "interrupted; no output was written; run the same command with --resume to continue from {tmp}/ckpt",
                process={"SPARSELLM_TEST_KILL_AT": "layer:0", "SPARSELLM_TEST_SIGNAL": "INT"},
                keeps=["ckpt", "ckpt/state.json", "ckpt/stage0-layer0.safetensors", "ckpt/stage0-inputs0.safetensors"])


@case
def checkpoint_exists_without_resume(w):
    ckpt = w.interrupted_checkpoint(*WANDA)
    return Case(w.prune(*WANDA, "--checkpoint-dir", ckpt), 9,
                "{tmp}/ckpt already holds a checkpoint; pass --resume to continue that run, or delete the folder to "
                "start over")


@case
def checkpoint_of_another_run(w):
    ckpt = w.interrupted_checkpoint(*WANDA)
    return Case(w.prune(*WANDA, "--sparsity", "0.6", "--checkpoint-dir", ckpt, "--resume"), 9,
                "the checkpoint in {tmp}/ckpt belongs to a different run (recipe differs); give the same model, recipe "
                "and data, or another --checkpoint-dir")


@case
def checkpoint_layer_file_damaged(w):
    ckpt = w.interrupted_checkpoint(*WANDA)
    layer = ckpt / "stage0-layer0.safetensors"
    layer.write_bytes(layer.read_bytes()[:100])  # bit rot, a copy cut short
    return Case(w.prune(*WANDA, "--checkpoint-dir", ckpt, "--resume"), 9, "the checkpoint in {tmp}/ckpt is damaged (stage0-layer0.safetensors: Error while "
                "deserializing header: invalid header length); delete the folder to start over")


@case
def checkpoint_layer_file_of_another_shape(w):
    from safetensors.torch import load_file, save_file

    ckpt = w.interrupted_checkpoint(*WANDA)
    tensors = load_file(ckpt / "stage0-layer0.safetensors")
    tensors["mlp.up_proj.weight"] = tensors["mlp.up_proj.weight"][:8]
    save_file(tensors, ckpt / "stage0-layer0.safetensors")
    return Case(w.prune(*WANDA, "--checkpoint-dir", ckpt, "--resume"), 9, "the checkpoint in {tmp}/ckpt is damaged (stage0-layer0.safetensors: Error(s) in loading "
                "state_dict for LlamaDecoderLayer: size mismatch for mlp.up_proj.weight: copying a param with shape "
                "torch.Size([8, 64]) from checkpoint, the shape in current model is torch.Size([128, 64]).); delete the "
                "folder to start over")


@case
def checkpoint_state_not_json(w):
    ckpt = w.interrupted_checkpoint(*WANDA)
    (ckpt / "state.json").write_text('{"format": 1, "fingerprint": ')
    return Case(w.prune(*WANDA, "--checkpoint-dir", ckpt, "--resume"), 9, "the checkpoint in {tmp}/ckpt is unreadable (JSONDecodeError: Expecting value: line 1 "
                "column 30 (char 29)); delete the folder to start over")


@case
def checkpoint_state_malformed(w):
    import json

    ckpt = w.interrupted_checkpoint(*WANDA)
    state = json.loads((ckpt / "state.json").read_text())
    state["passes"]["stage0"]["layers_done"] = "2"
    (ckpt / "state.json").write_text(json.dumps(state))
    return Case(w.prune(*WANDA, "--checkpoint-dir", ckpt, "--resume"), 9, "the checkpoint in {tmp}/ckpt is unreadable (state.json: pass stage0 is malformed); "
                "delete the folder to start over")


@case
def checkpoint_path_is_a_file(w):
    (w.tmp / "ckpt").write_text("notes")
    return Case(w.prune(*WANDA, "--checkpoint-dir", w.tmp / "ckpt"), 6, "checkpoint path {tmp}/ckpt is a file; give a folder to --checkpoint-dir")


@case
def checkpoint_folder_cannot_be_created(w):
    (w.tmp / "f").write_text("notes")
    return Case(w.prune(*WANDA, "--checkpoint-dir", w.tmp / "f" / "ckpt"), 6, "cannot create the checkpoint folder {tmp}/f/ckpt: Not a directory; choose another "
                "--checkpoint-dir")


@case
def checkpoint_write_refused(w):
    import sparsellm.checkpoint as checkpoint

    def refused(tensors, path):
        raise PermissionError(errno.EACCES, "Permission denied")

    w.monkeypatch.setattr(checkpoint, "save_file", refused)
    return Case(w.prune(*WANDA, "--checkpoint-dir", w.tmp / "ckpt"), 6, "cannot write the checkpoint in {tmp}/ckpt: Permission denied; choose another "
                "--checkpoint-dir", keeps=["ckpt", "ckpt/state.json"])


@case
def checkpoint_inside_the_output(w):
    # the output replaces its folder at the end, and a finished run deletes its checkpoint: never nest them
    return Case(w.prune(*WANDA, "--checkpoint-dir", w.out / "ckpt"), 2, "--checkpoint-dir {tmp}/out/ckpt and --output {tmp}/out overlap; give the checkpoint a "
                "folder of its own, outside the output folder")


@case
def sparsegpt_hessian_not_factorable(w):
    # no damping, and 16 calibration tokens for 64 inputs: X^T X is singular
    return Case(w.prune("--recipe", w.recipe({"method": "sparsegpt", "sparsity": 0.5, "percdamp": 0.0},
                                             calibration={"dataset": str(TEXT), "nsamples": 1, "seqlen": 16})), 8, "model.layers.0.self_attn.q_proj: linalg.cholesky: The factorization could not be completed "
                "because the input is not positive-definite (the leading minor of order 17 is not positive-definite).; "
                "raise the damping (percdamp, e.g. 0.1) or calibrate on more data")


@case
def maskllm_loss_not_finite(w):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # not a masked Linear: only the loss sees it
    d = w.tmp / "nan"
    model.save_pretrained(d)
    w.tokenizer.save_pretrained(d)
    path = w.tmp / "r.yaml"
    path.write_text(yaml.safe_dump({"calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16},
                                    "stages": [{"learn": {"method": "maskllm", "prior": "none", "steps": 2}}]}))
    return Case(["prune", "--model", d, "--recipe", path, "-o", w.out], 8, "maskllm: the loss became nan at step 0; lower lr or use mixed_precision: no")


@case
def slicegpt_opt_with_project_in_out(w):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("opt")
    cfg.word_embed_proj_dim = 32  # opt-350m's layout: embeddings narrower than the hidden size
    d = w.tmp / "opt"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    w.tokenizer.save_pretrained(d)
    return Case(["prune", "--model", d, "--slicing", "0.25", "--calib", TEXT, "--nsamples", 2, "--seqlen", 16, "-o", w.out],
                4, "SliceGPT: models with project_in/project_out (word_embed_proj_dim != hidden_size) are not "
                "supported; prune this model with a method that keeps its shapes (e.g. --method wanda) instead")


@case
def slicegpt_slicing_leaves_no_dimension(w):
    path = w.tmp / "r.yaml"
    path.write_text(yaml.safe_dump({"calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16},
                                    "stages": [{"slice": {"method": "slicegpt", "slicing": 0.9, "round_to": 64}}]}))
    return Case(w.prune("--recipe", path), 7, "SliceGPT: slicing 0.9 with round_to 64 leaves no dimension of 64; slice less, or use a "
                "smaller round_to")


@case
def slicegpt_uniform_narrower_than_the_heads(w):
    path = w.tmp / "r.yaml"
    path.write_text(yaml.safe_dump({"calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16},
                                    "stages": [{"slice": {"method": "slicegpt", "slicing": 0.95, "rotation": "uniform",
                                                          "round_to": 1}}]}))
    return Case(w.prune("--recipe", path), 7, "SliceGPT uniform: hidden size 3 must be a multiple of 4 for a stock llama config; slice less")


@case
def output_is_the_input(w):
    d = w.model()
    return Case(["prune", "--model", d, *MAGNITUDE, "-o", d], 6, "output folder {tmp}/model already exists; pass --overwrite to replace it")


# -- evaluation and publishing --------------------------------------------------------------------------
TASK_FIX = ("use a task name lm-eval knows (lm-eval ls tasks), 'suite' for boolq, rte, hellaswag, winogrande, "
            "arc_easy, arc_challenge, openbookqa, piqa, or a task YAML file / --task-path folder")


@case
def unknown_lm_eval_task(w):
    # refused before the model is loaded: the model path does not even exist
    return Case(["prune", "--model", w.tmp / "nothing", *MAGNITUDE, "--tasks", "zzzz_unknown", "-o", w.out], 2,
                "unknown lm-eval task 'zzzz_unknown'; " + TASK_FIX)


@case
def lm_eval_dataset_download_fails(w):
    # a task whose dataset is on the hub, not in the cache, with the hub unreachable
    import huggingface_hub.constants

    w.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    w.monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    w.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import datasets.config  # read the environment when first imported: an earlier case may have imported it

    w.monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (w.tmp / "tasks").mkdir()
    (w.tmp / "tasks" / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: sparsellm-tests/no-such-dataset\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{endings}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return Case(["eval", "--model", w.models["llama"], "--tasks", "hub_task", "--task-path", w.tmp / "tasks"], 5,
                "cannot get the data of lm-eval task(s) hub_task (Couldn't reach 'sparsellm-tests/no-such-dataset' on the "
                "Hub (OfflineModeIsEnabled)); the hub is needed for built-in tasks: connect once so datasets caches them, "
                "or use a local task YAML")


@case
def push_without_token(w):
    from huggingface_hub import constants

    out = w.tmp / "pruned"
    assert CliRunner().invoke(cli, [str(a) for a in w.prune(*MAGNITUDE)[:-1] + [out]]).exit_code == 0
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        w.monkeypatch.delenv(var, raising=False)
    w.monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(w.tmp / "no-hf-home" / "token"))
    return Case(["push", out, "--repo-id", "me/tiny"], 10,
                "no Hugging Face token found; log in with `hf auth login` or set HF_TOKEN, or use --dry-run to see "
                "what would be uploaded")
# -- export formats and 2:4 acceleration -------------------------------------------------------------
def _saved(w, fmt: str = "dense", pattern: str = "unstructured") -> Path:
    """A tiny Llama folder pruned by magnitude (per row or 2:4), written in `fmt`."""
    from sparsellm.compress.masks import nm_mask, row_mask
    from sparsellm.export import save_model

    model = tiny_model("llama")
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            scores = mod.weight.abs()
            mod.weight[nm_mask(scores, 2, 4) if pattern == "2:4" else row_mask(scores, 0.5)] = 0
    save_model(model, w.tokenizer, w.tmp / "pruned", fmt)
    return w.tmp / "pruned"


@case
def format_24_with_unstructured_stage(w):
    return Case(w.prune(*MAGNITUDE, "--format", "sparse-24-bitmask"), 2,
                "invalid recipe (command line): export format sparse-24-bitmask needs 2:4 weights, but stages.0 prunes "
                "with pattern unstructured; use pattern 2:4 or export as sparse-bitmask; fix that option (see sparsellm "
                "prune --help)")


@case
def export_24_of_unstructured_weights(w):
    return Case(["export", _saved(w), "--format", "sparse-24-bitmask", "-o", w.out], 7,
                "format sparse-24-bitmask needs 2:4-sparse weights, but model.layers.0.self_attn.q_proj is not 2:4 "
                "along its inputs; prune with pattern 2:4, or export as sparse-bitmask or dense")


@case
def compressed_weight_missing_a_part(w):
    from safetensors.torch import load_file, save_file

    folder = _saved(w, "sparse-bitmask")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.row_offsets"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return Case(["eval", "--model", folder, "--ppl", TEXT], 3,
                "{tmp}/pruned: compressed weight model.layers.1.mlp.up_proj lacks row_offsets; the file is incomplete, "
                "re-export the model")


@case
def semi_structured_without_cuda(w):
    return Case(["eval", "--model", _saved(w, pattern="2:4"), "--ppl", TEXT, "--dtype", "float16", "--semi-structured"], 2,
                "semi-structured 2:4 acceleration needs a CUDA GPU (compute capability 8.0+); run on a GPU with "
                "--device cuda, or drop --semi-structured")
# -- low-memory mode (sparsellm/lowmem) ----------------------------------------------------------------
@case
def low_memory_with_maskllm(w):
    # (SliceGPT runs layer by layer now: tests/test_lowmem.py compares it with in-memory runs)
    path = w.tmp / "r.yaml"
    path.write_text(yaml.safe_dump({"calibration": {"dataset": str(TEXT), "nsamples": 2, "seqlen": 16},
                                    "stages": [{"learn": {"method": "maskllm", "prior": "none", "steps": 2}}]}))
    return Case(w.prune("--recipe", path, "--low-memory"), 2,
                "--low-memory: stages.0: maskllm changes or trains the whole model at once; run it without --low-memory")


@case
def low_memory_with_lora_recovery(w):
    # (ECoFLaP and structured pruning run layer by layer now: tests/test_lowmem.py compares them with in-memory runs)
    return Case(w.prune("--structure", "wanda-sp", "--ffn", "0.25", "--recover-steps", 2, "--calib", TEXT, "--nsamples", 2,
                        "--seqlen", 16, "--low-memory"), 2,
                "--low-memory: stages.1: lora changes or trains the whole model at once; run it without --low-memory")


@case
def device_map_with_checkpoint(w):
    # (--low-memory resumes: tests/test_resume.py kills and resumes a streamed run)
    return Case(w.prune(*WANDA, "--checkpoint-dir", w.tmp / "ckpt", "--device-map", "auto"), 2,
                "--device-map: --checkpoint-dir/--resume restore layers into a model held in memory or streamed "
                "(--low-memory); drop them (an interrupted run leaves no output), or run without --device-map")


@case
def low_memory_hub_id(w):
    return Case(["prune", "--model", "org/model", *MAGNITUDE, "--low-memory", "-o", w.out], 3,
                "--low-memory: low-memory mode reads a local folder: download org/model first (hf download org/model "
                "--local-dir DIR) and give --model DIR")


@case
def low_memory_pickle_weights(w):
    d = w.pickle_only_model()
    return Case(["prune", "--model", d, *MAGNITUDE, "--low-memory", "--allow-pickle", "-o", w.out], 3,
                "--low-memory: model folder {tmp}/model has no safetensors weights (pickle files are loaded whole); "
                "convert them to safetensors, or run without --low-memory")


@case
def low_memory_corrupt_safetensors(w):
    d = w.model()
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return Case(["prune", "--model", d, *MAGNITUDE, "--low-memory", "-o", w.out], 3,
                "model weights of {tmp}/model are corrupt or truncated (Error while deserializing header: "
                "incomplete metadata, file not fully covered); re-download or re-export the model")


@case
def low_memory_missing_tensor(w):
    from safetensors.torch import load_file, save_file

    d = w.model()
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return Case(["prune", "--model", d, *MAGNITUDE, "--low-memory", "-o", w.out], 3,
                "tensor model.layers.1.mlp.up_proj.weight is missing from the safetensors of {tmp}/model; the "
                "checkpoint is incomplete: re-download or re-export it")


@case
def low_memory_interrupted(w):
    # layer 0 is already written to the output's temp folder: it goes with the rest
    return Case(w.prune(*WANDA, "--low-memory"), 130, "interrupted; no output was written",
                process={"SPARSELLM_TEST_KILL_AT": "layer:0", "SPARSELLM_TEST_SIGNAL": "INT"})


@case
def device_map_not_json(w):
    return Case(w.prune(*MAGNITUDE, "--device-map", "layers-on-disk"), 2,
                "--device-map 'layers-on-disk' is neither auto nor a JSON object of module name -> device; give e.g. "
                '\'{"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", ...}\'')


@case
def device_map_disk_without_offload_folder(w):
    return Case(w.prune(*MAGNITUDE, "--device-map", '{"model": "cpu", "model.layers.1": "disk", "lm_head": "cpu"}'), 2,
                "--device-map puts modules on disk: give --offload-folder DIR for their weights")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, model_dirs, tokenizer, tmp_path, monkeypatch, record_property):
    w = Workspace(tmp_path, model_dirs, tokenizer, monkeypatch)
    c = CASES[name](w)
    args = [str(a) for a in c.args]
    before = _tree(tmp_path)
    try:
        if c.process is not None:
            proc = cli_process(*args, env=c.process)
            code, output = proc.returncode, proc.stdout + proc.stderr
        else:
            r = CliRunner().invoke(cli, args, prog_name="sparsellm")
            code, output = r.exit_code, r.output
    finally:
        for p in tmp_path.rglob("*"):  # let pytest clean up what a case made unreadable
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    record_property("message", errors[0] if errors else "")
    record_property("exit_code", code)
    assert "Traceback" not in output, output
    assert code == c.code, output
    assert errors == ["error: " + c.message.replace("{tmp}", str(tmp_path))], output
    assert _tree(tmp_path) == before | set(c.keeps)  # no output folder, temp folder or temp file left
