"""Vocabularies for GGUF: our SentencePiece one as llama.cpp's `llama` (SPM) tokenizer (pieces, scores, token
types), and a release's byte-level BPE `tokenizer.json` as its `gpt2` tokenizer (pieces, types, merges and the
pre-tokenizer by the name llama.cpp knows it).

llama.cpp's own converter accepts only GPT-2-style BPE vocabularies for deepseek2, but the architecture does
not care which tokenizer a file carries; an SPM vocabulary written as `llama` loads and tokenizes as ours does.
"""

from __future__ import annotations

import json

import gguf

from ..hf_tokenizer import HFTokenizer
from ..tokenizer import CHAT_TEMPLATE, Tokenizer
from .errors import ConvertError


# The pre-tokenizers llama.cpp implements for the byte-level BPE vocabularies DeepSeek releases ship, by their
# `tokenizer.ggml.pre` name: the regexes of the `Split` steps of tokenizer.json's pre_tokenizer, in order.
PRE_TOKENIZERS = {
    "deepseek-v3": (  # DeepSeek-V3, V3.1, R1
        '\\p{N}{1,3}',
        '[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+',
        '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?['
        '\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+'),
    "deepseek-llm": (  # DeepSeek-V2, V2.5, V2-Lite
        '[\r\n]',
        '\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373'
        '\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481'
        '\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-'
        '\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57'
        '\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-'
        '\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-'
        '\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184'
        '\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-'
        '\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-'
        '\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2'
        '\U000118a0-\U000118df\U0001e900-\U0001e943]+',
        '\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+',
        '\\s+$',
        '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+',
        '\\p{N}+'),
}


def _token_type(sp, i: int) -> gguf.TokenType:
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    if sp.is_unused(i):
        return gguf.TokenType.UNUSED
    return gguf.TokenType.NORMAL


def add_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Write the vocabulary, padded with unused `[PAD{i}]` pieces up to the model's `vocab_size`."""
    sp = tokenizer.sp
    n = sp.get_piece_size()
    if n > vocab_size:
        raise ConvertError(f"{tokenizer.path}: {n} pieces, more than the model's vocab_size {vocab_size}")
    tokens = [sp.id_to_piece(i).encode() for i in range(n)] + [f"[PAD{i}]".encode() for i in range(n, vocab_size)]
    scores = [sp.get_score(i) for i in range(n)] + [-1000.0] * (vocab_size - n)
    types = [_token_type(sp, i) for i in range(n)] + [gguf.TokenType.UNUSED] * (vocab_size - n)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)  # as our training data and the HF files do
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)  # trained without SentencePiece's dummy-prefix space
    writer.add_chat_template(CHAT_TEMPLATE)


def _split_regexes(pre: dict | None, where) -> tuple[tuple[str, ...], dict]:
    """(the regexes of the Split steps, the last step): each Split isolating its matches, as llama.cpp does."""
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    regexes = []
    for step in steps[:-1]:
        kind = step.get("type")
        if kind == "Split" and "Regex" in (step.get("pattern") or {}) and (
                step.get("behavior") == "Isolated" and not step.get("invert")):
            regexes.append(step["pattern"]["Regex"])
        elif kind == "Digits":  # as a Split of digit runs (or of single digits)
            regexes.append("\\p{N}" if step.get("individual_digits") else "\\p{N}+")
        else:
            raise ConvertError(f"{where}: pre_tokenizer step {json.dumps(step)[:120]} has no llama.cpp equivalent")
    return tuple(regexes), steps[-1] if steps else {}


def pre_tokenizer_name(spec: dict, where) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json: `deepseek-v3`, `deepseek-llm`, or `gpt-2` for a
    plain GPT-2 ByteLevel one. Anything llama.cpp would split or normalise differently is refused: another
    pre-tokenizer, a normalizer, a prefix space, BPE options it does not apply."""
    model = spec.get("model") or {}
    normalizer = spec.get("normalizer")
    if normalizer and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        raise ConvertError(f"{where}: a {normalizer.get('type')} normalizer, which llama.cpp's gpt2 tokenizer "
                           "does not apply")
    odd = {k: model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix")
           if model.get(k)} | {k: True for k in ("byte_fallback", "ignore_merges") if model.get(k)}
    if odd:
        raise ConvertError(f"{where}: BPE options llama.cpp does not apply: {odd}")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    regexes, last = _split_regexes(pre, where)
    if last.get("type") == "ByteLevel" and not last.get("use_regex", True) and not last.get("add_prefix_space"):
        for name, known in PRE_TOKENIZERS.items():
            if regexes == known:
                return name
    raise ConvertError(f"{where}: its pre_tokenizer is none that llama.cpp implements for DeepSeek models "
                       f"({', '.join(PRE_TOKENIZERS)}, or GPT-2's ByteLevel); llama.cpp would tokenize differently")


def bpe_vocab(tokenizer: HFTokenizer, vocab_size: int) -> dict:
    """The GGUF fields of a byte-level BPE tokenizer.json (checked before any weight is read): tokens padded
    with unused `[PAD{i}]` pieces up to the model's `vocab_size`, types, merges and the pre-tokenizer's name.
    Special added tokens are CONTROL; the others USER_DEFINED, so their text is decoded, as transformers does
    (llama.cpp's own converter makes `<｜...｜>`-looking ones CONTROL)."""
    where = tokenizer.path
    spec = json.loads(where.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not tokenizer.byte_level:
        raise ConvertError(f"{where}: a {model.get('type')} vocabulary{'' if tokenizer.byte_level else ' (not byte-level)'}; "
                           "GGUF's gpt2 tokenizer is byte-level BPE")
    if tokenizer.vocab_size > vocab_size:
        raise ConvertError(f"{where}: {tokenizer.vocab_size} tokens, more than the model's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for piece, i in model.get("vocab", {}).items():
        tokens[i], types[i] = piece, gguf.TokenType.NORMAL
    for t in spec.get("added_tokens", []):
        tokens[t["id"]] = t["content"]
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]  # "a b" or ["a", "b"]
    return {"pre": pre_tokenizer_name(spec, where), "tokens": tokens, "types": types, "merges": merges}


def add_bpe_vocab(writer: gguf.GGUFWriter, tokenizer: HFTokenizer, vocab: dict) -> None:
    """`bpe_vocab`'s fields as llama.cpp's `gpt2` tokenizer, with the special ids and the chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    pad = tokenizer.tk.token_to_id(tokenizer.pad_token) if tokenizer.pad_token else None  # only one it names
    for add, i in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                   (writer.add_pad_token_id, pad)):
        if i is not None:
            add(i)
    writer.add_add_bos_token(tokenizer.bos_id is not None)  # as our generation and training prepend it
    writer.add_add_eos_token(False)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
