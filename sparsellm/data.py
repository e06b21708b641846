"""Text sources for calibration and evaluation, and the token windows drawn from them.

Sources (see docs/data.md):
- "wikitext2" and "c4": the hub datasets and protocols of the Wanda/SparseGPT papers;
- "hf:ORG/NAME[:CONFIG[:SPLIT[:FIELD]]]": any hub dataset through `datasets.load_dataset`, its
  documents in a text field, or chat turns (a `messages` list of {role, content}) rendered with the
  model's chat template;
- a local file: .txt (one document per line), .jsonl/.json/.parquet (a `text` field, or `messages`).
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

log = logging.getLogger(__name__)

C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
NAMED = ("wikitext2", "c4")
HUB_PREFIX = "hf:"
HUB_SYNTAX = "hf:ORG/NAME[:CONFIG[:SPLIT[:FIELD]]]"
DEFAULT_SPLITS = {"train": "train", "test": "test"}  # calibration, evaluation
TEXT_FIELDS = ("text", "messages")  # looked for in this order when no field is named


@dataclass(frozen=True)
class HubSource:
    """A hub dataset: `datasets.load_dataset(path, config, split=split)`, documents in `field`."""
    path: str
    config: str | None = None
    split: str | None = None  # default: "train" for calibration, "test" for evaluation
    field: str | None = None  # default: "text", else "messages"


# split on ":" except inside [...] (split slices such as train_sft[:512])
_PARTS = re.compile(r":(?![^\[]*\])")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def parse_hub_source(value: str) -> HubSource:
    """hf:ORG/NAME[:CONFIG[:SPLIT[:FIELD]]]; empty parts take the defaults (hf:org/chat::train_sft)."""
    if not value.startswith(HUB_PREFIX):
        raise ValueError(f"a hub dataset is written {HUB_SYNTAX}")
    parts = _PARTS.split(value[len(HUB_PREFIX):])
    if len(parts) > 4 or not _REPO.match(parts[0]):
        raise ValueError(f"{value!r} is not {HUB_SYNTAX} (e.g. hf:HuggingFaceH4/ultrachat_200k::train_sft[:512])")
    parts += [""] * (4 - len(parts))
    return HubSource(parts[0], *(p or None for p in parts[1:]))


def check_source(value: str) -> str:
    """The recipe's check of a data source (ValueError: pydantic names the field)."""
    if value in NAMED:
        return value
    if value.startswith(HUB_PREFIX):
        parse_hub_source(value)
        return value
    if not Path(value).is_file():
        raise ValueError(f"not {', '.join(NAMED)}, {HUB_SYNTAX}, or an existing file")
    return value


def _hub_dataset(*args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types for "offline / not found / no such split"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DataError(f"cannot get dataset {args[0]!r} from the hub ({type(e).__name__}{': ' + first if first else ''}); "
                        "check the name, config and split, or use a local .txt/.jsonl/.parquet file instead") from e


def read_documents(source: str, split: str, tokenizer=None) -> list[str]:
    """Documents of a source, in order. split is "train" (calibration) or "test" (evaluation). Chat
    data (hub or local `messages`) needs the tokenizer for its chat template."""
    if source == "wikitext2":
        # every line, empty ones included: the reference code joins the raw lines
        ds = _hub_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
        return list(ds["text"])
    if source == "c4":
        name = "train" if split == "train" else "validation"
        ds = _hub_dataset("allenai/c4", data_files={name: C4_FILES[name]}, split=name)
        return list(ds["text"])
    if source.startswith(HUB_PREFIX):
        return hub_documents(source, split, tokenizer)
    return read_local_documents(source, tokenizer)


def hub_documents(source: str, split: str, tokenizer=None, seed: int | None = None, max_tokens: int | None = None) -> list[str]:
    """Documents of a hf: source. With `seed` the rows are shuffled first (datasets' shuffle); with
    `max_tokens`, rows are taken until their token count reaches it (so that a large split is not
    rendered and tokenized whole)."""
    try:
        src = parse_hub_source(source)
    except ValueError as e:
        raise DataError(str(e)) from None
    ds = _hub_dataset(src.path, src.config, split=src.split or DEFAULT_SPLITS[split])
    field = _field(ds.column_names, src.field, source)
    if seed is not None:
        ds = ds.shuffle(seed=seed, keep_in_memory=True)  # an index permutation, not written to the cache
    docs, tokens = [], 0
    for row in ds.select_columns([field]):
        doc = _document(row[field], field, source, tokenizer)
        if not doc.strip():
            continue
        docs.append(doc)
        if max_tokens is not None:
            tokens += len(tokenizer(doc).input_ids)
            if tokens >= max_tokens:
                break
    if not docs:
        raise DataError(f"{source} contains no text in field {field!r}; name another field: {HUB_SYNTAX}")
    log.info("%s: %d documents (field %r, split %s)", source, len(docs), field, src.split or DEFAULT_SPLITS[split])
    return docs


def _field(columns: list[str], named: str | None, where) -> str:
    if named is not None:
        if named not in columns:
            raise DataError(f"{where} has no field {named!r} (fields: {', '.join(columns)}); name one of them")
        return named
    for f in TEXT_FIELDS:
        if f in columns:
            return f
    raise DataError(f"{where} has no 'text' or 'messages' field (fields: {', '.join(columns)}); put each document's "
                    "text in a 'text' field or its chat turns in a 'messages' field"
                    + (f", or name the field: {HUB_SYNTAX}" if str(where).startswith(HUB_PREFIX) else ""))


def _document(value, field: str, where, tokenizer) -> str:
    """A text value as it is, a list of chat turns rendered with the tokenizer's chat template."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and "role" in t and "content" in t for t in value):
        return render_chat(value, tokenizer, where)
    raise DataError(f"field {field!r} of {where} holds {type(value).__name__} values, neither text nor chat turns "
                    "(a list of {role, content}); name a text field")


def render_chat(messages: list[dict], tokenizer, where="chat data") -> str:
    """One conversation as the model sees it: the tokenizer's chat template, untokenized (as
    llm-compressor's ultrachat examples do)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where} holds chat messages but the model's tokenizer has no chat template; use a model "
                        "with a chat template, or data with a 'text' field")
    return tokenizer.apply_chat_template([{"role": t["role"], "content": t["content"]} for t in messages], tokenize=False)


def read_local_documents(path: str | Path, tokenizer=None) -> list[str]:
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
            field = _field(ds.column_names, None, path)
            docs = [_document(v, field, path, tokenizer) for v in ds[field]]
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


def joined(source: str, docs: list[str], split: str) -> str:
    """The documents as one text. WikiText-2 as the Wanda/SparseGPT code joins it: the train split
    (calibration) with single spaces, the test split (perplexity) with blank lines; everything else
    with blank lines."""
    return (" " if source == "wikitext2" and split == "train" else "\n\n").join(docs)


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int,
                        bos: int | None = None) -> torch.Tensor:
    """nsamples random windows of seqlen tokens, as the Wanda/SparseGPT reference code draws them. With `bos`
    (a token id, for models that always run after it, e.g. Gemma), each window is that token followed by
    seqlen - 1 drawn tokens, as the evaluation chunks are."""
    if bos is not None:
        text = calibration_windows(tokenizer, source, nsamples, seqlen - 1, seed)
        return torch.cat([torch.full((text.shape[0], 1), bos, dtype=text.dtype), text], dim=1)
    rng = random.Random(seed)
    if source == "c4":
        docs = read_documents(source, "train")
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
    if source.startswith(HUB_PREFIX):
        # rows in a seeded random order until there are enough tokens for the windows, then as local text
        docs = hub_documents(source, "train", tokenizer, seed=seed, max_tokens=nsamples * seqlen + seqlen + 1)
    else:
        docs = read_documents(source, "train", tokenizer)
    ids = _tokenize(tokenizer, joined(source, docs, "train"))
    if ids.numel() <= seqlen + 1:
        raise DataError(f"calibration text {source} has {ids.numel()} tokens, too few for windows of {seqlen}; "
                        f"give more than {seqlen + 1} tokens of text, or a smaller --seqlen")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def evaluation_chunks(tokenizer, source: str, seqlen: int, limit: int | None = None,
                      bos: int | None = None) -> torch.Tensor:
    """Non-overlapping seqlen-token chunks of the evaluation text (remainder dropped). With `bos` (a token
    id), each chunk is that token followed by seqlen - 1 tokens of text, for models that expect it."""
    if bos is not None:
        text = evaluation_chunks(tokenizer, source, seqlen - 1, limit)
        return torch.cat([torch.full((text.shape[0], 1), bos, dtype=text.dtype), text], dim=1)
    if source.startswith(HUB_PREFIX):  # in order; with a limit only as many rows as its chunks need
        docs = hub_documents(source, "test", tokenizer, max_tokens=limit * seqlen + 1 if limit else None)
    else:
        docs = read_documents(source, "test", tokenizer)
    if source == "c4":
        # the SparseGPT/Wanda C4 protocol: first 1100 validation documents, 256 windows
        ids = _tokenize(tokenizer, " ".join(docs[:1100]))[: 256 * seqlen]
    else:
        ids = _tokenize(tokenizer, joined(source, docs, "test"))
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation text {source} has {ids.numel()} tokens, fewer than one chunk of {seqlen}; "
                        "give more text, or a smaller seqlen")
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)
