"""Writing the output folder atomically: everything goes to a hidden temp folder beside the target,
renamed into place only when complete, so an interrupted run never leaves a folder that looks done."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from .errors import OutputError


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any expensive work if the output cannot be written."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file; choose a folder path")
    if out.exists() and not overwrite:
        raise OutputError(f"output folder {out} already exists; pass --overwrite to replace it")
    parent = out.resolve().parent
    while not parent.exists():  # missing parents are created at the end; the first existing one must be writable
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create the output folder: {parent} is a file; choose another --output")
    if not _writable(parent):
        raise OutputError(f"folder {parent} is not writable; choose another --output")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(out: Path) -> None:
    """Temp folders of earlier runs that were killed (SIGKILL, power loss) before they could clean up."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = stale.name[len(out.name) + 2:].rpartition("-")
        if kind in ("partial", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool):
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() and overwrite:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:  # fails if another run created a non-empty `out` meanwhile: never replace it without --overwrite
                tmp.rename(out)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise OutputError(f"output folder {out} was created by another run while this one was writing; this "
                                  "run's result was discarded: choose another --output, or pass --overwrite to replace "
                                  "it") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise OutputError(f"no space left on the device while writing {out}; free space and run again") from None
        raise OutputError(f"cannot write {out}: {e.strerror or e}; check the disk and permissions, or choose another --output") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_dtype(name: str, model_dtype, gguf: bool):
    """The torch dtype the weights are written in: `name`, or for `auto` bfloat16 when the model is a GGUF
    source dequantized to float32 (half the bytes; the quantized source holds far less precision than
    bfloat16), else the model's own dtype."""
    import torch

    if name == "auto":
        return torch.bfloat16 if gguf and model_dtype == torch.float32 else model_dtype
    return getattr(torch, name)


def save_model(model, tokenizer, folder: Path, fmt: str = "dense", dtype=None) -> int:
    """save_pretrained, then the weights cast to `dtype` (None: the model's) and rewritten in `fmt` (see
    formats.py; dense: left as they are). Returns the bytes of the dense safetensors in that dtype, before
    `fmt` rewrote them (what a dense export of the same dtype takes)."""
    from .formats import cast_folder, compress_folder

    # cast while saving, not after: writing the model's float32 first and casting the files then held the model,
    # the float32 files' mapped pages and the cast copy at once (3.6 GB for a 1.1 GB float32 model)
    cast_now = dtype is not None and dtype != model.dtype and not getattr(model, "hf_device_map", None)
    model.save_pretrained(folder, safe_serialization=True, **({"state_dict": cast_state_dict(model, dtype)}
                                                              if cast_now else {}))
    if any(getattr(model.config, k, None) is not None for k in ("sparsellm_slicing", "sparsellm_structure")):
        declare_runtime(Path(folder))
    if dtype is not None:
        cast_folder(Path(folder), model.dtype, dtype)
    dense = disk_bytes(folder)
    compress_folder(Path(folder), model, fmt)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    make_readable(folder)
    return dense


def cast_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """model.state_dict() with the tensors of the model's dtype cast to `dtype`; tensors that share storage (a
    tied head) stay one shared tensor, so that save_pretrained still writes them once."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in model.state_dict().items():
        if t.dtype != model.dtype:
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in cast:
            cast[key] = t.detach().to(dtype)
        out[name] = cast[key]
    return out


def make_readable(folder: Path) -> None:
    # safetensors writes through a private temp file (mode 0600); published files should be readable
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(folder).iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def disk_bytes(folder: Path) -> int:
    """Bytes of the model weights in a folder (safetensors shards)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
def declare_runtime(folder: Path) -> None:
    """A SliceGPT or structurally pruned model with per-layer shapes: its own model_type, and the runtime
    file named in auto_map so that transformers loads it with trust_remote_code=True (and refuses without)."""
    from .loading import modeling_sliced as runtime

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    base = runtime.base_model_type(cfg)
    config_name, model_name = runtime.class_names(base)
    module = Path(runtime.__file__).stem
    cfg.update(model_type=runtime.PREFIX + base, architectures=[model_name],
               auto_map={"AutoConfig": f"{module}.{config_name}", "AutoModelForCausalLM": f"{module}.{model_name}"})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.copyfile(runtime.__file__, folder / f"{module}.py")
