"""Our SentencePiece vocabulary as llama.cpp's `llama` (SPM) tokenizer: pieces, scores and token types.

llama.cpp's own converter accepts only GPT-2-style BPE vocabularies for deepseek2, but the architecture does
not care which tokenizer a file carries; an SPM vocabulary written as `llama` loads and tokenizes as ours does.
"""

from __future__ import annotations

import gguf

from ..tokenizer import CHAT_TEMPLATE, Tokenizer
from .errors import ConvertError


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
