"""Data pipeline: validation errors by file:line, skip counts, packing, masks, shuffling, splits, resumable batches."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from dh_mlx.train.tokenizer import train_tokenizer
from dh_mlx.train.data import (BatchIterator, DataError, DataSummary, Document, load_dataset, pack, read_jsonl,
                               split_documents, tokenize, unigram_entropy)

DOMAINS = ["general", "code", "math", "legal"]


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def docs_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "x = 1", "é", "\n"], size=rng.integers(3, 40)))
        rows.append({"domain": DOMAINS[i % 4], "text": f"doc {i}: {words}"} if i % 5 else {"text": f"doc {i}: {words}"})
    return rows


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("datatok")
    corpus = jsonl(root / "c.jsonl", docs_rows(200) + [{"text": "User: Assistant: System: 0123456789 ?"}])
    return train_tokenizer(corpus, root / "tok", vocab_size=320)


@pytest.fixture()
def corpus(tmp_path):
    return jsonl(tmp_path / "corpus.jsonl", docs_rows(60))


# ---- validation --------------------------------------------------------------------------------------------
BAD = [
    (b'{"text": "ok"}\n{"text": "unterminated\n', 2, "invalid JSON"),
    (b'{"text": "ok"}\n{"domain": "code"}\n', 2, 'missing "text" field'),
    (b'{"text": ["a"]}\n', 1, '"text" must be a string, got list'),
    (b'{"text": ""}\n', 1, '"text" is empty'),
    (b'{"text": "ok"}\n\n{"domain": "cooking", "text": "x"}\n', 3, "unknown domain 'cooking'"),
    (b'{"domain": 3, "text": "x"}\n', 1, '"domain" must be a string'),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "invalid UTF-8"),
    (b'\xef\xbb\xbf{"text": "a BOM is fine"}\n{"text": 1}\n', 2, '"text" must be a string'),
    (b"", 1, "empty file"),
    (b"\n  \n", 1, "empty file"),
    (b'["text"]\n', 1, "expected a JSON object, got list"),
    (b'{"text": "a", "prompt": "b", "completion": "c"}\n', 1, "record has both text and prompt/completion"),
    (b'{"prompt": "p"}\n', 1, 'missing "completion" field'),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "no assistant turn"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}\n', 1, "messages[0] must be"),
]


@pytest.mark.parametrize("content,line,problem", BAD, ids=[b[2] for b in BAD])
def test_every_error_names_file_and_line(tmp_path, content, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        list(read_jsonl(path, domains=DOMAINS))
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert problem in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        list(read_jsonl(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="holds no .jsonl files"):
        list(read_jsonl(tmp_path))


def test_skip_invalid_counts_every_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [b'{"text": "a"}', b"not json", b'{"text": 1}', b"", b'{"domain": "cooking", "text": "x"}',
             b'{"text": "\xff"}', b'{"domain": "math", "text": "b"}', b'{"nothing": 1}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    summary = DataSummary()
    records = list(read_jsonl(tmp_path, domains=DOMAINS, skip_invalid=True, summary=summary))
    assert [(r.path.name, r.line) for r in records] == [("mixed.jsonl", 1), ("mixed.jsonl", 7)]
    assert summary.skipped == {"invalid JSON": 1, "text not a string": 1, "unknown domain": 1, "invalid UTF-8": 1,
                               "missing text": 1, "empty file": 1}
    assert summary.records + sum(summary.skipped.values()) - 1 + summary.blank_lines == len(lines)
    assert summary.files == 2 and summary.domains == {"-": 1, "math": 1}
    assert summary.examples[0] == f"{tmp_path / 'empty.jsonl'}:1: empty file (no JSONL records)"
    assert "skipped 6" in str(summary)


def test_no_domains_accepts_any_label(tmp_path, tok):
    path = jsonl(tmp_path / "d.jsonl", [{"domain": "cooking", "text": "x"}])
    (record,) = read_jsonl(path)
    assert tokenize(record, tok).domain == -1
    assert tokenize(record, tok, ["cooking"]).domain == 0


# ---- tokenizing and packing ------------------------------------------------------------------------------------
def test_packing_keeps_every_token_once_in_order(tok, corpus):
    docs = [tokenize(r, tok, DOMAINS) for r in read_jsonl(corpus, domains=DOMAINS)]
    T = 16
    p = pack(docs, T, tok.pad_id)
    assert p.tokens.shape == (math.ceil(sum(len(d.ids) for d in docs) / (T + 1)), T + 1)
    flat, seg, dom = p.tokens.reshape(-1), p.segments.reshape(-1), p.domains.reshape(-1)
    n = sum(len(d.ids) for d in docs)
    assert np.array_equal(flat[:n], np.concatenate([d.ids for d in docs]))
    assert (flat[n:] == tok.pad_id).all() and (seg[n:] == -1).all() and (dom[n:] == -1).all()
    starts = np.cumsum([0] + [len(d.ids) for d in docs])
    for d, s in zip(docs, starts):
        assert flat[s] == tok.bos_id and flat[s + len(d.ids) - 1] == tok.eos_id
        assert (dom[s:s + len(d.ids)] == d.domain).all()
    assert (flat[:n] == tok.eos_id).sum() == len(docs)
    # segment ids: 0 at each row start, +1 exactly where a document starts inside a row
    for row_tok, row_seg in zip(p.tokens, p.segments):
        real = row_seg >= 0
        assert row_seg[0] == 0
        steps = np.diff(row_seg[real])
        assert set(steps.tolist()) <= {0, 1}
        assert np.array_equal(steps == 1, row_tok[real][1:] == tok.bos_id)


def test_batch_arrays_and_loss_mask(tok, corpus):
    docs = [tokenize(r, tok, DOMAINS) for r in read_jsonl(corpus, domains=DOMAINS)]
    p = pack(docs, 32, tok.pad_id)
    b = p.batch(np.arange(len(p)))
    for name, dtype in (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                        ("segment_ids", np.int32), ("domain_ids", np.int32)):
        a = getattr(b, name)
        assert a.dtype == dtype and a.shape == (len(p), 32), name
    assert np.array_equal(b.inputs[:, 1:], b.targets[:, :-1])
    on = b.loss_mask > 0
    # trained: every target except a document's <s> and padding; so each document's </s> is trained
    assert not on[b.targets == tok.bos_id].any() and not on[b.targets == tok.pad_id].any()
    assert on[b.targets == tok.eos_id].all()
    assert on.sum() == ((b.targets != tok.bos_id) & (b.targets != tok.pad_id)).sum()


def test_prompt_completion_and_chat_masks(tmp_path, tok):
    path = jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "2+2=", "completion": "4"},
        {"domain": "math", "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "3+3?"},
                                        {"role": "assistant", "content": "6"},
                                        {"role": "user", "content": "and 1+1?"},
                                        {"role": "assistant", "content": "2"}]}])
    pc, chat = [tokenize(r, tok, DOMAINS) for r in read_jsonl(path, domains=DOMAINS)]
    trained = lambda d: [int(i) for i, t in zip(d.ids, d.train) if t]
    assert trained(pc) == tok.encode("4") + [tok.eos_id]
    assert tok.decode(pc.ids[~pc.train]) == "2+2="
    assert trained(chat) == tok.encode("6") + [tok.eos_id] + tok.encode("2") + [tok.eos_id]
    assert tok.decode(chat.ids) == "System: Be brief.\nUser: 3+3?\nAssistant: 6User: and 1+1?\nAssistant: 2"
    assert chat.domain == DOMAINS.index("math") and pc.domain == -1
    b = pack([pc, chat], 256, tok.pad_id).batch(np.arange(1))
    assert [int(t) for t, m in zip(b.targets[0], b.loss_mask[0]) if m] == trained(pc) + trained(chat)


# ---- shuffling, splitting, batches -----------------------------------------------------------------------------
def test_shuffle_and_split_are_deterministic(tok, corpus):
    a = load_dataset(corpus, tok, seq_len=16, domains=DOMAINS, seed=3)
    b = load_dataset(corpus, tok, seq_len=16, domains=DOMAINS, seed=3)
    c = load_dataset(corpus, tok, seq_len=16, domains=DOMAINS, seed=4)
    assert np.array_equal(a.train.tokens, b.train.tokens) and np.array_equal(a.valid.tokens, b.valid.tokens)
    assert not np.array_equal(a.train.tokens, c.train.tokens)
    assert a.summary.records == 60
    assert a.summary.tokens == (a.train.segments >= 0).sum() + (a.valid.segments >= 0).sum()


def test_validation_split_is_disjoint_by_document(tok, corpus):
    ds = load_dataset(corpus, tok, seq_len=16, domains=DOMAINS, val_fraction=0.2, seed=1)

    def documents(packed):
        flat = packed.tokens.reshape(-1)
        flat = flat[flat != tok.pad_id]
        ends = np.flatnonzero(flat == tok.eos_id)
        return [tok.decode(d) for d in np.split(flat, ends + 1)[:-1]]

    train, valid = documents(ds.train), documents(ds.valid)
    assert len(valid) == 12 and len(train) == 48
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(r["text"] for r in docs_rows(60))
    assert len(load_dataset(corpus, tok, seq_len=16, val_fraction=0.05).valid.tokens) > 0


def test_split_documents_counts():
    docs = [Document(np.array([1, i, 2], np.int32), np.ones(3, bool), -1) for i in range(40)]
    train, valid = split_documents(docs, 0.05, seed=0)
    assert len(valid) == 2 and len(train) == 38
    assert {id(d) for d in train}.isdisjoint(id(d) for d in valid)
    assert split_documents(docs, 0.0)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)


def test_iterator_resumes_with_identical_batches(tok, corpus):
    ds = load_dataset(corpus, tok, seq_len=16, domains=DOMAINS, seed=0)
    it = ds.train_batches(4, seed=7)
    first_epoch = it.batches_per_epoch
    for _ in range(first_epoch + 3):  # past an epoch boundary
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    assert state["epoch"] == 1 and state["index"] == 3 and state["seed"] == 7
    expected = [next(it) for _ in range(first_epoch)]
    resumed = ds.train_batches(4, seed=0)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [next(resumed) for _ in range(first_epoch)]):
        for a, b in zip(want, got):
            assert np.array_equal(a, b)
    other = load_dataset(corpus, tok, seq_len=16, domains=DOMAINS, seed=1).train_batches(4)
    with pytest.raises(DataError, match="differs from the data"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="batch_size 4, not 2"):
        ds.train_batches(2).load_state_dict(state)


def test_epochs_cover_rows_and_reshuffle(tok, corpus):
    ds = load_dataset(corpus, tok, seq_len=16, seed=0)
    it = BatchIterator(ds.train, 2, seed=0)
    n = it.batches_per_epoch
    epoch0 = [next(it).inputs for _ in range(n)]
    epoch1 = [next(it).inputs for _ in range(n)]
    rows = {r.tobytes() for r in ds.train.tokens[:, :-1]}
    assert {r.tobytes() for b in epoch0 for r in b} <= rows and len({r.tobytes() for b in epoch0 for r in b}) == 2 * n
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, epoch1))


def test_eval_iterator_single_pass_padded(tok, corpus):
    ds = load_dataset(corpus, tok, seq_len=16, val_fraction=0.3, seed=0)
    batches = list(ds.valid_batches(4))
    assert len(batches) == math.ceil(len(ds.valid) / 4)
    assert all(b.inputs.shape == (4, 16) for b in batches)
    full = ds.valid.batch(np.arange(len(ds.valid)))
    assert sum(b.loss_mask.sum() for b in batches) == full.loss_mask.sum()
    assert np.array_equal(np.concatenate([b.targets for b in batches])[:len(ds.valid)], full.targets)


def test_too_little_data_for_a_batch(tok, tmp_path):
    path = jsonl(tmp_path / "one.jsonl", [{"text": "short"}])
    ds = load_dataset(path, tok, seq_len=64, val_fraction=0)
    with pytest.raises(DataError, match="fewer than one batch of 8"):
        ds.train_batches(8)
    with pytest.raises(DataError, match="no valid records"):
        load_dataset(jsonl(tmp_path / "bad.jsonl", ["nope"]), tok, seq_len=8, skip_invalid=True)


def test_unigram_entropy():
    docs = [Document(np.array([5, 6, 5, 6], np.int32), np.array([False, True, True, True]), -1)]
    # targets 6, 5, 6 trained: p = (1/3, 2/3)
    assert unigram_entropy(pack(docs, 3)) == pytest.approx(-(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)))


# ---- the bundled corpus and tokenizer --------------------------------------------------------------------------
def test_bundled_corpus_and_tokenizer():
    from dh_mlx.config import DATA_DIR, load_preset
    from dh_mlx.tokenizer import load_tokenizer
    config = load_preset("tiny")
    tok = load_tokenizer(DATA_DIR / "tokenizer")
    assert tok.vocab_size == config.vocab_size == 8192
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (config.pad_token_id, config.bos_token_id, config.eos_token_id)
    assert sum(p.stat().st_size for p in (DATA_DIR / "tokenizer").iterdir()) < 1_000_000
    assert (DATA_DIR / "train_data.jsonl").stat().st_size < 4_000_000
    summary = DataSummary()
    texts = [r.parts[0].text for r in read_jsonl(DATA_DIR / "train_data.jsonl",
                                                  domains=config.domain_routing.domains, summary=summary)]
    assert len(summary.domains) >= 4 and "-" not in summary.domains
    assert all(tok.decode(tok.encode(t)) == t for t in texts[::20])


@pytest.mark.slow
def test_corpus_builder_is_deterministic():
    from dh_mlx.config import DATA_DIR
    spec = importlib.util.spec_from_file_location("build_corpus", DATA_DIR / "build_corpus.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    records = builder.build(seed=1)
    assert records == builder.build(seed=1)
    assert {r["domain"] for r in records} >= {"code", "general", "math", "science"}  # legal needs licence files
