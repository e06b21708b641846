"""Data sources: local files for real, the hub datasets (wikitext2, c4) through a mocked load_dataset."""
import json
import random

import pytest
import torch

from conftest import TEXT
from sparsellm import data
from sparsellm.errors import DataError, ModelLoadError
from sparsellm.loading.models import load_model, resolve_model


class FakeDataset(dict):
    @property
    def column_names(self):
        return list(self)


def test_windows_follow_the_benchmark_protocol(tokenizer):
    docs = [l for l in TEXT.read_text().split("\n") if l.strip()]
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    random.seed(5)
    starts = [random.randint(0, ids.numel() - 16 - 1) for _ in range(4)]
    expected = torch.stack([ids[s:s + 16] for s in starts])
    assert torch.equal(data.calibration_windows(tokenizer, str(TEXT), 4, 16, seed=5), expected)


def test_eval_chunks_non_overlapping_remainder_dropped(tokenizer):
    docs = [l for l in TEXT.read_text().split("\n") if l.strip()]
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    chunks = data.evaluation_chunks(tokenizer, str(TEXT), 100)
    assert chunks.shape == (ids.numel() // 100, 100)
    assert torch.equal(chunks.flatten(), ids[: chunks.numel()])
    assert data.evaluation_chunks(tokenizer, str(TEXT), 100, limit=2).shape == (2, 100)


def test_jsonl_json_parquet_sources(tmp_path, tokenizer):
    docs = [l for l in TEXT.read_text().split("\n") if l.strip()][:30]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    (tmp_path / "d.json").write_text(json.dumps([{"text": d} for d in docs]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(docs))
    ref = data.calibration_windows(tokenizer, str(txt), 3, 20, seed=1)
    for name in ("d.jsonl", "d.json", "d.parquet"):
        assert data.read_local_documents(tmp_path / name) == docs
        assert torch.equal(data.calibration_windows(tokenizer, str(tmp_path / name), 3, 20, seed=1), ref)


@pytest.mark.parametrize("content,needle", [
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (b"\n  \n", "contains no text"),
])
def test_bad_text_files(tmp_path, content, needle):
    p = tmp_path / "x.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=needle):
        data.read_local_documents(p)


def test_missing_text_field_and_unknown_suffix(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(DataError, match="no 'text' field"):
        data.read_local_documents(tmp_path / "a.jsonl")
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match="unsupported data file type .csv"):
        data.read_local_documents(tmp_path / "a.csv")


def test_too_short_calibration_text(tmp_path, tokenizer):
    p = tmp_path / "s.txt"
    p.write_text("just a few words\n")
    with pytest.raises(DataError, match="too few for windows"):
        data.calibration_windows(tokenizer, str(p), 2, 64, seed=0)
    with pytest.raises(DataError, match="fewer than one chunk"):
        data.evaluation_chunks(tokenizer, str(p), 64)


def test_wikitext2_uses_standard_ids_and_joins_lines(monkeypatch, tokenizer):
    calls = []
    lines = [l for l in TEXT.read_text().split("\n")][:60]

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeDataset(text=lines)

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake)
    chunks = data.evaluation_chunks(tokenizer, "wikitext2", 50)
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    ids = tokenizer("\n\n".join(lines), return_tensors="pt").input_ids[0]
    assert torch.equal(chunks.flatten(), ids[: chunks.numel()])
    data.calibration_windows(tokenizer, "wikitext2", 2, 50, seed=0)
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})


def test_c4_draws_windows_inside_long_enough_documents(monkeypatch, tokenizer):
    short = "tiny."
    long_docs = [l for l in TEXT.read_text().split("\n") if len(l) > 400][:10]
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeDataset(text=[short, *long_docs, short])

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake)
    w = data.calibration_windows(tokenizer, "c4", 5, 40, seed=0)
    assert calls[0][0] == ("allenai/c4",)
    assert calls[0][1] == {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}
    assert w.shape == (5, 40)
    doc_ids = [tokenizer(d, return_tensors="pt").input_ids[0].tolist() for d in long_docs]
    for row in w.tolist():  # every window lies inside a single document
        assert any(any(ids[s:s + 40] == row for s in range(len(ids) - 39)) for ids in doc_ids)
    data.evaluation_chunks(tokenizer, "c4", 40)
    assert calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_hub_unreachable_is_one_clear_error(monkeypatch, tokenizer):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot get dataset 'wikitext' from the hub"):
        data.calibration_windows(tokenizer, "wikitext2", 2, 16, seed=0)


def test_hub_model_id_resolution_and_offline_error(monkeypatch):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    import transformers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="cannot download 'HuggingFaceTB/SmolLM2-135M': the hub is unreachable"):
        load_model("HuggingFaceTB/SmolLM2-135M")


def test_demo_alias_resolves_to_packaged_gguf():
    src = resolve_model(None)
    assert src.kind == "demo" and src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model("smollm2-135m") == src
