"""GGUF export of a release-style byte-level BPE `tokenizer.json`: written as llama.cpp's `gpt2` tokenizer with
its merges and the pre-tokenizer llama.cpp knows it by (`deepseek-v3`, `deepseek-llm`, `gpt-2`); llama.cpp
(llama-cpp-python) produces our token ids, text, logits and greedy tokens from it."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx.tokenizer import load_tokenizer
from helpers import ASSISTANT, EOS, TEXTS, USER, make_bpe_tokenizer, make_checkpoint

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from dh_mlx.convert import ConvertError, export_gguf  # noqa: E402

VOCAB = 410  # past the tokenizer's 402 ids: the padded rows are written as unused pieces
PROMPT = "The model routes 12 tokens to experts: naïve café, 中文 and かな. " * 3


@pytest.fixture
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def model_dir(root, pre: str, **overrides):
    model = make_checkpoint(root / "m", vocab_size=VOCAB, **overrides)
    make_bpe_tokenizer(root / "m", pre=pre)
    return model, root / "m"


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("pre", ["deepseek-v3", "deepseek-llm", "gpt-2"])
def test_llama_cpp_tokenizes_as_we_do(tmp_path, llama_cpp, pre):
    _, d = model_dir(tmp_path, pre)
    export_gguf(d, tmp_path / "m.gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    ours = load_tokenizer(d)
    for text in TEXTS + [PROMPT, f"{USER}Hi{ASSISTANT}", "   \n\n\t  x  "]:
        ids = ours.encode(text, bos=True)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, (pre, text)
        if EOS not in text:
            assert llm.detokenize(ids[1:]).decode() == text, (pre, text)


def test_llama_cpp_gives_our_logits_and_greedy_tokens(tmp_path, llama_cpp):
    ours, d = model_dir(tmp_path, "deepseek-v3")
    export_gguf(d, tmp_path / "m.gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), logits_all=True, n_ctx=256, verbose=False,
                          type_k=0, type_v=0)  # a float32 KV cache
    tok = load_tokenizer(d)
    ids = tok.encode_chat([{"role": "user", "content": PROMPT}])
    assert llm.tokenize(tok.apply_chat_template([{"role": "user", "content": PROMPT}]).encode(), add_bos=False,
                        special=True) == ids
    llm.eval(ids)
    ref = np.array(ours(mx.array([ids]))[0])
    assert np.abs(np.array(llm.scores[: len(ids)]) - ref).max() <= 1e-4
    theirs, mine = list(ids), list(ids)
    for _ in range(12):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(theirs[-1:])
        mine.append(int(mx.argmax(ours(mx.array([mine]))[0, -1]).item()))
    assert theirs == mine


def test_metadata(tmp_path):
    _, d = model_dir(tmp_path, "deepseek-v3")
    export_gguf(d, tmp_path / "m.gguf", outtype="f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    spec = json.loads((d / "tokenizer.json").read_text())
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "deepseek-v3"
    assert len(field(reader, "tokenizer.ggml.merges")) == len(spec["model"]["merges"]) > 100
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == VOCAB and tokens[0] == "<｜begin▁of▁sentence｜>" and tokens[VOCAB - 1] == f"[PAD{VOCAB - 1}]"
    T = gguf.TokenType
    assert (types[0], types[1], types[400], types[VOCAB - 1], types[300]) == (
        T.CONTROL, T.CONTROL, T.USER_DEFINED, T.UNUSED, T.NORMAL)
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (0, 1)
    assert "{{ bos_token }}" in field(reader, "tokenizer.chat_template")


def _edit(spec: dict, change: str) -> None:
    steps = spec["pre_tokenizer"]["pretokenizers"]
    if change == "regex":
        steps[0]["pattern"]["Regex"] = r"\p{N}{1,4}"
    elif change == "behavior":
        steps[1]["behavior"] = "Removed"
    elif change == "prefix_space":
        steps[-1]["add_prefix_space"] = True
    elif change == "normalizer":
        spec["normalizer"] = {"type": "Lowercase"}
    elif change == "byte_fallback":
        spec["model"]["byte_fallback"] = True


@pytest.mark.parametrize("change", ["regex", "behavior", "prefix_space", "normalizer", "byte_fallback"])
def test_what_llama_cpp_would_tokenize_otherwise_is_refused_before_reading_weights(tmp_path, monkeypatch, change):
    import dh_mlx.convert.gguf as writer
    _, d = model_dir(tmp_path, "deepseek-v3")
    spec = json.loads((d / "tokenizer.json").read_text())
    _edit(spec, change)
    (d / "tokenizer.json").write_text(json.dumps(spec))
    monkeypatch.setattr(writer, "read_weights", lambda *a: pytest.fail("read the weights first"))
    with pytest.raises(ConvertError, match="llama.cpp"):
        export_gguf(d, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_digits_step_reads_as_its_split(tmp_path, llama_cpp):
    """DeepSeek-LLM's digit step written as tokenizers' `Digits`: the same split, and llama.cpp agrees."""
    _, d = model_dir(tmp_path, "deepseek-llm")
    spec = json.loads((d / "tokenizer.json").read_text())
    steps = spec["pre_tokenizer"]["pretokenizers"]
    assert steps[-2]["pattern"]["Regex"] == r"\p{N}+"
    steps[-2] = {"type": "Digits", "individual_digits": False}
    (d / "tokenizer.json").write_text(json.dumps(spec))
    export_gguf(d, tmp_path / "m.gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    ours = load_tokenizer(d)
    for text in TEXTS + [PROMPT]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ours.encode(text, bos=True), text
