"""Tokenizer: exact round trips, byte fallback, special ids, streaming, and agreement with transformers/mlx-lm."""

from __future__ import annotations

import random
import shutil
import sys

import pytest

from helpers import corpus_lines
from hypothesis import given, settings, strategies as st

from dh_mlx import tokenizer as tk
from dh_mlx.tokenizer import StreamDecoder, TokenizerError, load_tokenizer
from dh_mlx.train.tokenizer import train_tokenizer
from dh_mlx.train.data import DataError, chat_text

VOCAB = 400
SAMPLES = ["Hello world", "  two leading spaces\nand a newline", "def f(x):\n\treturn x ** 2  # 1234\n",
           "émoji 😀 and 中文", "", " ", "a\u2581b", "Assistant: yes"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    data = root / "corpus.jsonl"
    data.write_text("\n".join(corpus_lines()) + "\n")
    return train_tokenizer(data, root / "out", vocab_size=VOCAB), root / "out", data


def test_files_and_special_ids(trained):
    tok, out, _ = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert tok.vocab_size == VOCAB
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tok.encode("x", bos=True, eos=True)[0] == 1 and tok.encode("x", bos=True, eos=True)[-1] == 2
    assert load_tokenizer(out).vocab_size == VOCAB
    assert load_tokenizer(out.parent) is None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(trained, s):
    tok = trained[0]
    ids = tok.encode(s)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == s
    assert tok.decode(tok.encode(s, bos=True, eos=True)) == s


@pytest.mark.parametrize("s", ["   leading", "trailing  \n\n", "\t\ttabs\r\n", "😀🇫🇷", "\x00nul", "\u2581\u2581 x",
                               "</s><s><pad>", "龍 never seen"])
def test_round_trip_edges(trained, s):
    tok = trained[0]
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert not {tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id} & set(ids)


def test_byte_fallback(trained):
    tok = trained[0]
    ids = tok.encode("龍")  # absent from the corpus: its three UTF-8 bytes
    assert [tok.id_to_piece(i) for i in ids] == ["<0xE9>", "<0xBE>", "<0x8D>"]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_stream_decoder_pieces_concatenate_to_decode(trained, s):
    tok = trained[0]
    d = tok.stream_decoder()
    pieces = [d.add(i) for i in tok.encode(s, bos=True, eos=True)]
    assert "".join(pieces) + d.flush() == s
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in s


def test_stream_decoder_holds_split_characters(trained):
    tok = trained[0]
    ids = tok.encode("😀")
    assert len(ids) == 4
    d = StreamDecoder(tok)
    assert [d.add(i) for i in ids] == ["", "", "", "😀"]
    d.add(ids[0])
    assert d.flush() == "\ufffd" and d.flush() == ""


def test_stream_decoder_matches_decode_on_arbitrary_ids(trained):
    tok = trained[0]
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(0, 260) if rng.random() < 0.7 else rng.randrange(VOCAB) for _ in range(rng.randrange(9))]
        d = tok.stream_decoder()
        assert "".join(d.add(i) for i in ids) + d.flush() == tok.decode(ids), ids


def test_training_is_deterministic(trained, tmp_path):
    _, out, data = trained
    train_tokenizer(data, tmp_path, vocab_size=VOCAB)
    assert (tmp_path / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    assert (tmp_path / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


def test_transformers_sees_the_same_tokenizer(trained):
    from transformers import AutoTokenizer
    tok, out, _ = trained
    hf = AutoTokenizer.from_pretrained(out)
    assert len(hf) == hf.vocab_size == VOCAB
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    for s in SAMPLES:
        if "\u2581" in s:  # HF reads a literal U+2581 as a space marker; we keep it as text
            continue
        assert hf.encode(s) == tok.encode(s, bos=True), s
        assert hf.encode(s, add_special_tokens=False) == tok.encode(s)
        assert hf.decode(tok.encode(s)) == s


def test_transformers_without_tokenizer_json(trained, tmp_path, monkeypatch):
    """Where the `tokenizers` package is missing, transformers converts tokenizer.model itself."""
    from transformers import AutoTokenizer
    tok, out, _ = trained
    monkeypatch.setattr(tk, "_write_tokenizer_json", lambda tokenizer, path: False)
    tk.write_hf_files(tok, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == VOCAB
    for s in SAMPLES[:5]:
        assert hf.encode(s) == tok.encode(s, bos=True), s


def test_mlx_lm_sees_the_same_tokenizer(trained):
    from mlx_lm.tokenizer_utils import load
    tok, out, _ = trained
    wrapper = load(out)
    assert wrapper.vocab_size == VOCAB
    assert wrapper.bos_token_id == tok.bos_id and set(wrapper.eos_token_ids) == {tok.eos_id}
    for s in SAMPLES[:5]:
        ids = wrapper.encode(s)
        assert ids == tok.encode(s, bos=True), s
        detok = wrapper.detokenizer
        detok.reset()
        for i in ids[1:]:
            detok.add_token(i)
        detok.finalize()
        assert detok.text == s


def test_chat_template_matches_our_format(trained):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(trained[1])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"}]
    assert hf.apply_chat_template(messages, tokenize=False) == chat_text(messages)
    prompt = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>System: Be brief.\nUser: 2+2?\nAssistant: "


def test_training_errors(trained, tmp_path):
    data = trained[2]
    with pytest.raises(TokenizerError, match="vocab_size must be an integer >= 261"):
        train_tokenizer(data, tmp_path, vocab_size=100)
    with pytest.raises(TokenizerError, match=r"too large: this corpus supports at most \d+"):
        train_tokenizer(data, tmp_path, vocab_size=50000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(DataError, match=rf"^{bad}:2: "):
        train_tokenizer(bad, tmp_path / "out", vocab_size=300)
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        (tmp_path / "tokenizer.model").write_text("junk")
        load_tokenizer(tmp_path)


def test_cli_tokenizer_train(trained, tmp_path, monkeypatch, capsys):
    from dh_mlx import cli
    data = trained[2]
    monkeypatch.setattr(sys, "argv", ["dh-mlx", "tokenizer", "train", "--data", str(data), "--out", str(tmp_path),
                                      "--vocab-size", str(VOCAB)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code in (0, None)
    assert "vocabulary 400" in capsys.readouterr().err  # a status line: stdout stays free
    assert load_tokenizer(tmp_path).vocab_size == VOCAB
    monkeypatch.setattr(sys, "argv", ["dh-mlx", "tokenizer", "train", "--data", str(tmp_path / "none.jsonl"),
                                      "--out", str(tmp_path / "second")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "none.jsonl: no such file" in err


def test_copied_directory_loads(trained, tmp_path):
    shutil.copytree(trained[1], tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode("Hello world") == trained[0].encode("Hello world")
