"""Resumable runs (--checkpoint-dir, --resume).

After every decoder layer of a compression pass the checkpoint folder receives the layer's tensors as
compressed, the calibration activations entering the next layer, the methods' running state and the
torch RNG state; finished allocate stages and the perplexity before compression are kept as results.
Resuming restores all of that and continues with the next layer, so the output is the same, byte for
byte, as that of an uninterrupted run. A fingerprint of the model weights, the recipe and the
calibration tokens is checked first: a checkpoint of a different run is refused.

Files (safetensors and JSON only, nothing is unpickled):
  state.json                      the commit record: fingerprint, layers done per pass, results
  <pass>-layer<I>.safetensors     decoder layer I after the pass (all its tensors) + RNG state
  <pass>-inputs<I>.safetensors    the inputs of layer I + 1; only the newest one is kept
Each file is written under a temp name and renamed into place (os.replace), state.json last: a kill at
any moment leaves the previous or the new progress, never a torn file."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import CheckpointError, OutputError, RecipeError
from .faults import fault_point

log = logging.getLogger(__name__)

FORMAT = 1
STATE = "state.json"
RNG_KEY = "__torch_rng_state__"


def _sha256_tensors(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def fingerprint(weights, recipe, windows: torch.Tensor | None) -> dict:
    """What makes two runs the same: the dense weights as loaded (whatever their source; `weights`:
    (name, tensor) pairs in a fixed order, e.g. ModelHandle.weights()), the recipe (without its `model`
    field: the weights say which model), the calibration tokens, the version."""
    recipe_json = json.dumps({k: v for k, v in recipe.dump().items() if k != "model"}, sort_keys=True)
    return {
        "sparsellm": __version__,
        "model": _sha256_tensors(weights),
        "recipe": hashlib.sha256(recipe_json.encode()).hexdigest(),
        "data": "none" if windows is None else _sha256_tensors([("windows", windows)]),
    }


def check_folder(folder: Path, resume: bool, output: Path | None = None) -> None:
    """Cheap checks before the model is loaded. `output`: the run's output folder, which must not be the
    checkpoint folder or hold it, nor lie inside it (the output replaces its folder when the run ends, and
    the checkpoint is deleted then)."""
    if output is not None:
        ck, out = Path(folder).resolve(), Path(output).resolve()
        if ck == out or out in ck.parents or ck in out.parents:
            raise RecipeError(f"--checkpoint-dir {folder} and --output {output} overlap; give the checkpoint a "
                              "folder of its own, outside the output folder")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"checkpoint path {folder} is a file; give a folder to --checkpoint-dir")
    if (folder / STATE).exists() and not resume:
        raise CheckpointError(f"{folder} already holds a checkpoint; pass --resume to continue that run, "
                              "or delete the folder to start over")


class Checkpoint:
    def __init__(self, folder: str | Path, fp: dict, resume: bool):
        self.folder = Path(folder)
        check_folder(self.folder, resume)
        self.resumed: dict = {}  # what was taken from the checkpoint, for the report
        if (self.folder / STATE).exists():
            self.state = self._read_state()
            if self.state.get("format") != FORMAT:
                raise CheckpointError(f"the checkpoint in {self.folder} has format {self.state.get('format')}, this "
                                      f"version reads {FORMAT}; delete the folder to start over")
            differ = [k for k in fp if self.state["fingerprint"].get(k) != fp[k]]
            if differ:
                raise CheckpointError(f"the checkpoint in {self.folder} belongs to a different run ({' and '.join(differ)} "
                                      f"differ{'s' if len(differ) == 1 else ''}); give the same model, recipe and data, "
                                      "or another --checkpoint-dir")
            log.info("resuming from the checkpoint in %s", self.folder)
        else:
            if resume:
                log.info("no checkpoint in %s yet; starting from the beginning", self.folder)
            self.state = {"format": FORMAT, "fingerprint": fp, "passes": {}, "results": {}}
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create the checkpoint folder {self.folder}: {e.strerror or e}; "
                                  "choose another --checkpoint-dir") from None
            self._commit()
        self._sweep()

    # -- results of whole steps (allocation, perplexity before) --------------------------------------
    def result(self, key: str):
        if key in self.state["results"]:
            self.resumed[key] = True
        return self.state["results"].get(key)

    def put_result(self, key: str, value) -> None:
        self.state["results"][key] = value
        self._commit()

    # -- state of a training stage (tensors + JSON), the newest only ---------------------------------------
    def save_tensors(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._write(self.folder / f"{key}.safetensors", lambda p: save_file(tensors, p))
        self.put_result(key, meta)

    def load_tensors(self, key: str) -> dict[str, torch.Tensor]:
        return self._load(self.folder / f"{key}.safetensors")

    # -- layer-by-layer passes ---------------------------------------------------------------------------
    def layers_done(self, pass_key: str) -> int:
        return self.state["passes"].get(pass_key, {}).get("layers_done", 0)

    def restore(self, pass_key: str, layers, methods, io=None) -> int:
        """Put back the layers a pass finished and the methods' state; returns how many. With the layer
        walk's `io` (a streamed model), each layer is brought in, restored and released (written to the
        output) in turn."""
        done = self.layers_done(pass_key)
        if done > len(layers):
            raise self._damaged(f"{pass_key} claims {done} decoder layers done, the model has {len(layers)}")
        saved = self.state["passes"].get(pass_key, {}).get("methods", [])
        if done and len(saved) != len(methods):
            raise self._damaged(f"{pass_key} holds the state of {len(saved)} methods, the recipe has {len(methods)}")
        for i in range(done):
            path = self._layer_file(pass_key, i)
            tensors = self._load(path)
            rng = tensors.pop(RNG_KEY, None)
            if io is not None:
                io.load(i, layers[i])
            try:
                if rng is None or rng.dtype != torch.uint8:
                    raise ValueError("no RNG state")
                layers[i].load_state_dict(tensors)  # strict: every tensor of the layer, each of its shape
            except (RuntimeError, ValueError) as e:
                raise self._damaged(f"{path.name}: {' '.join(str(e).split())[:400]}") from None
            if io is not None:
                io.release(i, layers[i])
        if done:
            try:
                torch.set_rng_state(rng)
                for method, state in zip(methods, saved):
                    method.load_state(state)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise self._damaged(f"{pass_key}: {type(e).__name__}: {e}") from None
            self.resumed[pass_key] = done
            log.info("%s: %d of %d decoder layers restored from the checkpoint", pass_key, done, len(layers))
        return done

    def inputs(self, pass_key: str, index: int, device) -> list[torch.Tensor]:
        """The saved inputs of decoder layer `index` (outputs of layer index - 1)."""
        path = self._inputs_file(pass_key, index - 1)
        t = self._load(path)
        if sorted(t) != sorted(map(str, range(len(t)))):
            raise self._damaged(f"{path.name} does not hold numbered batches")
        return [t[str(b)].to(device) for b in range(len(t))]

    def save_layer(self, pass_key: str, index: int, layer, inputs: list[torch.Tensor] | None, methods) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        tensors[RNG_KEY] = torch.get_rng_state()
        self._write(self._layer_file(pass_key, index), lambda p: save_file(tensors, p))
        if inputs is not None:
            batches = {str(b): h.detach().cpu().contiguous() for b, h in enumerate(inputs)}
            self._write(self._inputs_file(pass_key, index), lambda p: save_file(batches, p))
        fault_point(f"save:{index}")
        self.state["passes"][pass_key] = {"layers_done": index + 1, "methods": [m.state() for m in methods]}
        self._commit()
        self._inputs_file(pass_key, index - 1).unlink(missing_ok=True)  # superseded

    def remove(self) -> None:
        """After a successful run: nothing is left to resume. The commit record goes first, so a kill
        while deleting leaves no checkpoint that looks resumable."""
        (self.folder / STATE).unlink(missing_ok=True)
        for f in self.folder.glob("*.safetensors"):  # only the files a checkpoint writes, whatever else is there
            if f.stem in self.state["results"] or re.fullmatch(r".+-(layer|inputs)\d+", f.stem):
                f.unlink(missing_ok=True)
        self._sweep()
        try:
            self.folder.rmdir()
        except OSError:  # the user keeps other files there
            pass

    # -- files ---------------------------------------------------------------------------------------
    def _layer_file(self, pass_key: str, index: int) -> Path:
        return self.folder / f"{pass_key}-layer{index}.safetensors"

    def _inputs_file(self, pass_key: str, index: int) -> Path:
        return self.folder / f"{pass_key}-inputs{index}.safetensors"

    def _sweep(self) -> None:
        """Temp files of a save that was killed, and inputs files no commit refers to."""
        for f in self.folder.glob(".*.tmp-*"):
            f.unlink(missing_ok=True)
        keep = {self._inputs_file(k, p["layers_done"] - 1).name for k, p in self.state["passes"].items()}
        for f in self.folder.glob("*-inputs*.safetensors"):
            if f.name not in keep:
                f.unlink(missing_ok=True)

    def _write(self, path: Path, write) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            write(tmp)
            with open(tmp, "rb") as f:  # on disk before the rename makes it count
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise OutputError(f"no space left on the device while writing the checkpoint in {self.folder}; "
                                  "free space and run again with --resume") from None
            raise OutputError(f"cannot write the checkpoint in {self.folder}: {e.strerror or e}; "
                              "choose another --checkpoint-dir") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _commit(self) -> None:
        text = json.dumps(self.state, indent=1)
        self._write(self.folder / STATE, lambda p: Path(p).write_text(text, encoding="utf-8"))

    def _read_state(self) -> dict:
        try:
            state = json.loads((self.folder / STATE).read_text(encoding="utf-8"))
            problem = state_problem(state)
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise CheckpointError(f"the checkpoint in {self.folder} is unreadable ({problem}); "
                                  "delete the folder to start over") from None
        return state

    def _damaged(self, detail: str) -> CheckpointError:
        return CheckpointError(f"the checkpoint in {self.folder} is damaged ({detail}); delete the folder to start over")

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(path)
        except (OSError, SafetensorError) as e:
            raise self._damaged(f"{path.name}: {e}") from None


def state_problem(state) -> str | None:
    """What is wrong with the structure of a state.json (None: nothing), checked before any of it is used."""
    if not isinstance(state, dict):
        return f"state.json holds {type(state).__name__}, not a mapping"
    kinds = {"format": int, "fingerprint": dict, "passes": dict, "results": dict}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"state.json: {key} missing or not {kind.__name__}"
    if not all(isinstance(v, str) for v in state["fingerprint"].values()):
        return "state.json: fingerprint values are not strings"
    for name, p in state["passes"].items():
        done = p.get("layers_done") if isinstance(p, dict) else None
        if not isinstance(done, int) or isinstance(done, bool) or done < 0 or not isinstance(p.get("methods"), list) \
                or not all(isinstance(m, dict) for m in p["methods"]):
            return f"state.json: pass {name} is malformed"
    return None
