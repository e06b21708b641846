"""Data sources: local files for real, the hub datasets (wikitext2, c4) through a mocked load_dataset."""
import json
import random
import types

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


def test_windows_for_a_model_that_needs_bos_start_with_it(tokenizer):
    """Gemma-style models: BOS, then seqlen - 1 tokens drawn as the plain windows of that length are."""
    plain = data.calibration_windows(tokenizer, str(TEXT), 4, 15, seed=5)
    with_bos = data.calibration_windows(tokenizer, str(TEXT), 4, 16, seed=5, bos=7)
    assert with_bos.shape == (4, 16)
    assert bool((with_bos[:, 0] == 7).all()) and torch.equal(with_bos[:, 1:], plain)


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
    with pytest.raises(DataError, match="no 'text' or 'messages' field \\(fields: body\\)"):
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


class CharTokenizer:
    """One token per character (its code point): token ids that can be written down by hand."""

    def __call__(self, text, return_tensors=None):
        ids = [ord(c) for c in text]
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


def _reference_wikitext2(nsamples, seed, seqlen, tokenizer, traindata, testdata):
    """get_wikitext2 of locuslab/wanda (lib/data.py) and IST-DASLab/sparsegpt (datautils.py), verbatim
    but for load_dataset."""
    trainenc = tokenizer(" ".join(traindata['text']), return_tensors='pt')
    testenc = tokenizer("\n\n".join(testdata['text']), return_tensors='pt')
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        inp = trainenc.input_ids[:, i:j]
        tar = inp.clone()
        tar[:, :-1] = -100
        trainloader.append((inp, tar))
    return trainloader, testenc


def test_wikitext2_joined_as_the_reference_code_joins_it(monkeypatch, tokenizer):
    """Calibration: the train split's raw lines (empty ones included) joined with single spaces; perplexity:
    the test split joined with blank lines. Exact ids, by hand and against the reference code."""
    import datasets

    splits = {"train": FakeDataset(text=[" = A = \n", "", " b c \n"]), "test": FakeDataset(text=["x\n", "", "yz\n"])}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split, **k: splits[split])
    tok = CharTokenizer()
    # " = A = \n" + " " + "" + " " + " b c \n"
    train_ids = [32, 61, 32, 65, 32, 61, 32, 10, 32, 32, 32, 98, 32, 99, 32, 10]
    random.seed(3)
    starts = [random.randint(0, len(train_ids) - 4 - 1) for _ in range(5)]
    w = data.calibration_windows(tok, "wikitext2", 5, 4, seed=3)
    assert w.tolist() == [train_ids[s:s + 4] for s in starts]
    test_ids = [120, 10, 10, 10, 10, 10, 121, 122, 10]  # "x\n" + "\n\n" + "" + "\n\n" + "yz\n"
    assert data.evaluation_chunks(tok, "wikitext2", 3).tolist() == [test_ids[0:3], test_ids[3:6], test_ids[6:9]]

    # the same with the real tokenizer of the tests, on longer text, against the reference function
    lines = TEXT.read_text().split("\n")[:80]
    lines[3:3] = ["", " = = Heading = = \n", ""]
    splits = {"train": FakeDataset(text=lines[:50]), "test": FakeDataset(text=lines[50:])}
    loader, testenc = _reference_wikitext2(6, 0, 32, tokenizer, splits["train"], splits["test"])
    assert torch.equal(data.calibration_windows(tokenizer, "wikitext2", 6, 32, seed=0), torch.cat([x for x, _ in loader]))
    chunks = data.evaluation_chunks(tokenizer, "wikitext2", 32)
    assert torch.equal(chunks.flatten(), testenc.input_ids[0, : chunks.numel()])


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def chat_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _conversations(n: int) -> list[dict]:
    docs = [l for l in TEXT.read_text().split("\n") if l.strip()]
    return [{"prompt": docs[i][:40], "messages": [{"role": "user", "content": docs[i][:60]},
                                                  {"role": "assistant", "content": docs[i][60:120]}]} for i in range(n)]


def _rendered(row) -> str:
    return "".join(f"<|{t['role']}|> {t['content']}</s>" for t in row["messages"])


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset with the download replaced: the rows come from memory, the calls are recorded."""
    import datasets

    calls, tables, real = [], {}, datasets.load_dataset

    def load_dataset(path, name=None, split=None, **kwargs):
        if path in ("json", "parquet"):  # local files are read for real
            return real(path, name, split=split, **kwargs)
        calls.append((path, name, split))
        if path not in tables:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")
        return datasets.Dataset.from_list(tables[path])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return types.SimpleNamespace(calls=calls, tables=tables)


def test_hub_chat_dataset_rendered_with_the_chat_template(fake_hub, chat_tokenizer, tmp_path):
    import datasets

    rows = _conversations(12)
    fake_hub.tables["org/chat"] = rows
    w = data.calibration_windows(chat_tokenizer, "hf:org/chat::train_sft", 4, 32, seed=7)
    assert fake_hub.calls == [("org/chat", None, "train_sft")]
    # the rows in datasets' seeded order, each conversation through the template, then windows as for a
    # local file holding those documents
    order = datasets.Dataset.from_list(rows).shuffle(seed=7)
    rendered = [_rendered(r) for r in order]
    assert rendered[0] == chat_tokenizer.apply_chat_template(order[0]["messages"], tokenize=False)
    # ... as many as the windows need: rows until their tokens reach nsamples * seqlen + seqlen + 1
    docs, n = [], 0
    while n < 4 * 32 + 32 + 1:
        docs.append(rendered[len(docs)])
        n += len(chat_tokenizer(docs[-1]).input_ids)
    assert 1 < len(docs) < len(rows)
    local = tmp_path / "rendered.jsonl"
    local.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert torch.equal(w, data.calibration_windows(chat_tokenizer, str(local), 4, 32, seed=7))
    # a local .jsonl of chat turns is rendered the same way (file order: no shuffle for local files)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in order.select(range(len(docs)))))
    assert data.read_local_documents(chat, chat_tokenizer) == docs
    assert torch.equal(data.calibration_windows(chat_tokenizer, str(chat), 4, 32, seed=7), w)


def test_hub_text_field_config_split_and_token_budget(fake_hub, tokenizer):
    docs = [l for l in TEXT.read_text().split("\n") if l.strip()]
    fake_hub.tables["org/news"] = [{"id": i, "body": d} for i, d in enumerate(docs)]
    # a large split: only as many rows as the windows need are read (in the seeded order)
    got = data.hub_documents("hf:org/news:en:train[:90%]:body", "train", tokenizer, seed=1, max_tokens=2000)
    assert fake_hub.calls[-1] == ("org/news", "en", "train[:90%]")
    assert 1 < len(got) < len(docs) and sum(len(tokenizer(d).input_ids) for d in got[:-1]) < 2000
    assert sum(len(tokenizer(d).input_ids) for d in got) >= 2000
    assert set(got) <= set(docs)
    # evaluation: the "test" split by default, rows in order, chunks as for local text
    chunks = data.evaluation_chunks(tokenizer, "hf:org/news:::body", 40, limit=3)
    assert fake_hub.calls[-1] == ("org/news", None, "test")
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    assert chunks.shape == (3, 40) and torch.equal(chunks.flatten(), ids[:120])
    full = data.evaluation_chunks(tokenizer, "hf:org/news:::body", 40)
    assert full.shape == (ids.numel() // 40, 40)


def test_hub_dataset_errors(fake_hub, tokenizer):
    fake_hub.tables["org/chat"] = _conversations(3)
    with pytest.raises(DataError, match="tokenizer has no chat template"):
        data.calibration_windows(tokenizer, "hf:org/chat", 2, 16, seed=0)
    with pytest.raises(DataError, match=r"has no field 'body' \(fields: prompt, messages\)"):
        data.calibration_windows(tokenizer, "hf:org/chat:::body", 2, 16, seed=0)
    fake_hub.tables["org/other"] = [{"a": 1, "b": "x"}]
    with pytest.raises(DataError, match="no 'text' or 'messages' field .* or name the field: hf:ORG/NAME"):
        data.calibration_windows(tokenizer, "hf:org/other", 2, 16, seed=0)
    with pytest.raises(DataError, match="field 'a' of hf:org/other:::a holds int values"):
        data.calibration_windows(tokenizer, "hf:org/other:::a", 2, 16, seed=0)
    with pytest.raises(DataError, match=r"cannot get dataset 'org/missing' from the hub \(FileNotFoundError: Dataset"):
        data.calibration_windows(tokenizer, "hf:org/missing", 2, 16, seed=0)


@pytest.mark.parametrize("value,parsed", [
    ("hf:org/name", data.HubSource("org/name")),
    ("hf:wikitext", data.HubSource("wikitext")),
    ("hf:org/name:cfg", data.HubSource("org/name", "cfg")),
    ("hf:HuggingFaceH4/ultrachat_200k::train_sft[:512]", data.HubSource("HuggingFaceH4/ultrachat_200k", None, "train_sft[:512]")),
    ("hf:org/n.a-me_2:c:test[10:20]:content", data.HubSource("org/n.a-me_2", "c", "test[10:20]", "content")),
])
def test_hub_source_syntax(value, parsed):
    assert data.parse_hub_source(value) == parsed
    assert data.check_source(value) == value


@pytest.mark.parametrize("value", ["hf:", "hf:org/name:a:b:c:d", "hf:/abs/path", "hf:a/b/c", "no-such-file.txt"])
def test_bad_source_names(value):
    with pytest.raises(ValueError):
        data.check_source(value)


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
