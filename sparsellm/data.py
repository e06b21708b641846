"""Text sources for calibration and evaluation, and the token windows drawn from them.

Sources: "wikitext2" and "c4" (hub, through `datasets`, the ids the Wanda/SparseGPT papers use) or a
local file: .txt (one document per line), .jsonl/.json/.parquet (a `text` field).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from .errors import DataError

log = logging.getLogger(__name__)

C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def _hub_dataset(*args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types for "offline / not found"
        raise DataError(f"cannot get dataset {args[0]!r} from the hub ({type(e).__name__}); "
                        "use a local .txt/.jsonl/.parquet file instead") from e


def read_documents(source: str, split: str) -> list[str]:
    """Documents of a source. split is "train" (calibration) or "test" (evaluation)."""
    if source == "wikitext2":
        ds = _hub_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
        return list(ds["text"])
    if source == "c4":
        name = "train" if split == "train" else "validation"
        ds = _hub_dataset("allenai/c4", data_files={name: C4_FILES[name]}, split=name)
        return list(ds["text"])
    return read_local_documents(source)


def read_local_documents(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            docs = path.read_text(encoding="utf-8").split("\n")
        elif suffix in (".jsonl", ".json", ".parquet"):
            import datasets

            ds = datasets.load_dataset("parquet" if suffix == ".parquet" else "json", data_files=str(path), split="train")
            if "text" not in ds.column_names:
                raise DataError(f"{path} has no 'text' field (fields: {', '.join(ds.column_names)}); "
                               "put each document's text in a 'text' field")
            docs = list(ds["text"])
        else:
            raise DataError(f"unsupported data file type {suffix or '(none)'} for {path}; use .txt, .jsonl, .json or .parquet")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); "
                        "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                        "check that the file is complete and in the format its extension says") from e
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise DataError(f"{path} contains no text; give a file with the documents to calibrate or evaluate on")
    return docs


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples random windows of seqlen tokens, as the Wanda/SparseGPT reference code draws them."""
    rng = random.Random(seed)
    docs = read_documents(source, "train")
    if source == "c4":
        # C4 documents are drawn one at a time and a window taken inside one long enough.
        windows = []
        for _ in range(nsamples):
            for _attempt in range(10_000):
                ids = _tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)])
                if ids.numel() > seqlen:
                    break
            else:
                raise DataError(f"no C4 document longer than {seqlen} tokens found; use a smaller --seqlen")
            start = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[start:start + seqlen])
        return torch.stack(windows)
    ids = _tokenize(tokenizer, "\n\n".join(docs))
    if ids.numel() <= seqlen + 1:
        raise DataError(f"calibration text {source} has {ids.numel()} tokens, too few for windows of {seqlen}; "
                        f"give more than {seqlen + 1} tokens of text, or a smaller --seqlen")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def evaluation_chunks(tokenizer, source: str, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping seqlen-token chunks of the evaluation text (remainder dropped)."""
    docs = read_documents(source, "test")
    if source == "c4":
        # the SparseGPT/Wanda C4 protocol: first 1100 validation documents, 256 windows
        ids = _tokenize(tokenizer, " ".join(docs[:1100]))[: 256 * seqlen]
    else:
        ids = _tokenize(tokenizer, "\n\n".join(docs))
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation text {source} has {ids.numel()} tokens, fewer than one chunk of {seqlen}; "
                        "give more text, or a smaller seqlen")
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)
