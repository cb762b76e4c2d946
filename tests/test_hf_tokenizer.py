"""tokenizer.json directories as DeepSeek releases ship them (byte-level BPE, added and special tokens, a chat
template, eos ids in generation_config.json, no tokenizer.model): our ids, text and chat prompts equal
transformers' AutoTokenizer's, and streaming never breaks a character."""

import json

import pytest

from dh_mlx.tokenizer import TokenizerError, load_tokenizer
from helpers import TEXTS

transformers = pytest.importorskip("transformers")



def test_ids_and_text_equal_autotokenizers(tokenizer_dir):
    ours, theirs = load_tokenizer(tokenizer_dir), transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert type(ours).__name__ == "HFTokenizer" and ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.encode(text, bos=True) == [theirs.bos_token_id] + ids
    assert ours.eos_ids == (1, 401) and ours.bos_id == 0  # generation_config.json's list comes first


def test_chat_template_text_and_ids_equal_apply_chat_templates(tokenizer_dir):
    ours, theirs = load_tokenizer(tokenizer_dir), transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 = ?"},
                    {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 🙂?"}]
    for add in (True, False):
        want = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(conversation, add_generation_prompt=add) == want
        want_ids = theirs.apply_chat_template(conversation, tokenize=True, add_generation_prompt=add,
                                              return_dict=True)["input_ids"]
        assert ours.encode_chat(conversation, add_generation_prompt=add) == list(want_ids)


def test_streaming_never_emits_half_a_character(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        decoder = tok.stream_decoder()
        pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids) and "\ufffd" not in "".join(pieces), text
    assert any(len(tok.encode(c)) > 1 for c in "🙂👍🏽中")  # the premise: characters split over tokens


def test_a_custom_tokenizer_class_is_named_not_run(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    (tmp_path / "tokenization_kimi.py").write_text("raise SystemExit('ran code from the checkpoint')\n")
    with pytest.raises(TokenizerError, match="custom class tokenization_kimi.TikTokenTokenizer, code that dh-mlx"):
        load_tokenizer(tmp_path)


def test_a_vocabulary_that_is_not_byte_level_streams_whole_text(tmp_path):
    """A Metaspace BPE tokenizer.json (SentencePiece-like): pieces join to decode()'s text, spaces kept."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tk.train_from_iterator([t * 10 for t in TEXTS], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert not tok.byte_level
    for text in ("the quick brown fox", "naïve café ½ – 中文字符"):
        ids = tok.encode(text)
        decoder = tok.stream_decoder()
        pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids) and " " in "".join(pieces), text
