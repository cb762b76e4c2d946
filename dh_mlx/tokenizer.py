"""SentencePiece BPE tokenizer: exact encode/decode, streaming detokenization, Hugging Face files (training: train/tokenizer.py).

Every setting serves one promise: `decode(encode(s)) == s` for any text. The normalizer is the identity (no NFKC,
no whitespace folding), there is no dummy-prefix space, and characters outside the vocabulary fall back to their
UTF-8 bytes (`<0x00>`..`<0xFF>`), so nothing is ever `<unk>`. Special ids are those of `parameters/*.json`:
pad 0, bos 1, eos 2, unk 3. A model directory also gets `tokenizer.json` / `tokenizer_config.json`, which
transformers' `AutoTokenizer` and mlx-lm load with the same vocabulary and the same ids (they add BOS by default,
as our training data does). Two differences remain: they read the literal text `<s>`/`</s>` as special tokens
(we never do), and a literal U+2581 as a space (we keep it, as its three bytes).
"""

from __future__ import annotations

import codecs
import functools
import json
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from .files import FileKindError, copy_file, read_bytes, same_file, write_atomic

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
MODEL_FILE = "tokenizer.model"
# SentencePiece writes a space as U+2581 and reads U+2581 back as a space; we escape the literal one as bytes.
_SPACE_MARK = "\u2581"

# Our chat format (see dh_mlx/train/data.py), for transformers' and mlx-lm's `apply_chat_template`.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")


# As SentencePiece decodes invalid UTF-8: one U+FFFD per bad byte (Python's "replace" gives one per bad run).
_PER_BYTE = "dh_mlx.replace_per_byte"
codecs.register_error(_PER_BYTE, lambda e: ("\ufffd" * (e.end - e.start), e.end))


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded; the message says which file or option and why."""


class Tokenizer:
    """A trained SentencePiece model with exact round trips (`decode(encode(s)) == s`)."""

    def __init__(self, model_file: str | Path):
        self.path = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=read_bytes(self.path, "tokenizer"))
        except FileKindError as e:
            raise TokenizerError(str(e)) from None
        except (OSError, RuntimeError, TypeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({str(e).splitlines()[0][:200]})") from None
        self._mark_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode()]
        # Bytes each id contributes to the decoded text (None for control tokens).
        self._bytes = [self._piece_bytes(i) for i in range(self.sp.get_piece_size())]

    def _piece_bytes(self, i: int) -> bytes | None:
        if self.sp.is_byte(i):
            return bytes([int(self.sp.id_to_piece(i)[3:5], 16)])
        if self.sp.is_control(i):
            return None
        if self.sp.is_unknown(i):
            return self.sp.decode([i]).encode()
        return self.sp.id_to_piece(i).replace(_SPACE_MARK, " ").encode()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end a turn."""
        return (self.eos_id,)

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id stands for in decoded text (None: a control token, which decodes to nothing)."""
        return list(self._bytes)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for (so a text of n bytes needs >= n / this tokens)."""
        return max(len(b) for b in self._bytes if b)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, limit: int | None = None,
                    **template_args) -> list[int]:
        """Ids of `messages` in our chat format (CHAT_TEMPLATE), each part tokenized on its own as
        train/data.py tokenizes a `messages` record; then `Assistant: ` for the reply. `limit`: see `encode`.
        Our format has no variables: `template_args` (a release template's) are refused."""
        from .chat import ChatTemplateError, check_messages
        from .hf_tokenizer import check_length
        if template_args:
            raise ChatTemplateError(f"our tokenizer's chat format takes no template arguments "
                                    f"({', '.join(template_args)}); they are for a tokenizer.json chat template")
        check_length(self, sum(len(m["content"].encode("utf-8", "replace")) for m in check_messages(messages)), limit)
        ids = [self.bos_id]
        for m in check_messages(messages):
            if m["role"] == "assistant":
                ids += self.encode("Assistant: ") + self.encode(m["content"]) + [self.eos_id]
            else:
                ids += self.encode(f"{m['role'].capitalize()}: {m['content']}\n")
        return ids + (self.encode("Assistant: ") if add_generation_prompt else [])

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, limit: int | None = None) -> list[int]:
        """Token ids of `text`; special tokens only where asked (the text `</s>` is ordinary text). With `limit`
        (a context length), a text that cannot fit in that many tokens is refused before it is tokenized."""
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise TokenizerError(f"the text holds U+{ord(text[e.start]):04X} at character {e.start}: a lone "
                                 "surrogate, which no UTF-8 text can hold") from None
        if limit is not None:
            from .hf_tokenizer import check_length
            check_length(self, size, limit)
        parts = text.split(_SPACE_MARK)
        ids = [self.bos_id] if bos else []
        for k, part in enumerate(parts):
            if k:
                ids += self._mark_ids
            if part:
                ids += self.sp.encode(part)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Text of a growing id sequence, one finished piece at a time.

    A character split across byte-fallback tokens (an emoji is four `<0xNN>` tokens) is held back until its last
    byte arrives, so every returned piece is whole text and the concatenation of all pieces plus `flush()` is
    `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=_PER_BYTE)

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (possibly empty)."""
        piece = self.tokenizer._bytes[int(token_id)]
        # SentencePiece ends a byte run at a special token: bytes before it cannot join bytes after it.
        return self._utf8.decode(piece) if piece is not None else self.flush()

    def flush(self) -> str:
        """Text still held back (each byte of an unfinished character becomes U+FFFD); then start afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---- training --------------------------------------------------------------------------------------------
# ---- Hugging Face files ----------------------------------------------------------------------------------
def _bpe_merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: a piece's splits into two pieces, ranked by the
    piece's id (SentencePiece merges the highest-scoring pair first, and ids are in score order)."""
    sp = tokenizer.sp
    ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
           if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    ranked = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((i, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _write_tokenizer_json(tokenizer: Tokenizer, path: Path) -> bool:
    try:
        from tokenizers import AddedToken, decoders, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE
    except ImportError:
        return False
    sp = tokenizer.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    hf = HFTokenizer(BPE(vocab=vocab, merges=_bpe_merges(tokenizer), unk_token=UNK, fuse_unk=True,
                         byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE_MARK, prepend_scheme="never", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace(_SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                      special_tokens=[(BOS, tokenizer.bos_id)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, BOS, EOS, UNK)])
    write_atomic(path, lambda f: hf.save(f, pretty=False))
    return True


def write_hf_files(tokenizer: Tokenizer, out_dir: str | Path) -> None:
    """Write the transformers/mlx-lm side files beside (or from) `tokenizer.model`; a Hugging Face tokenizer's
    own files are copied."""
    out_dir = Path(out_dir)
    if not isinstance(tokenizer, Tokenizer):
        return tokenizer.write_files(out_dir)
    if not same_file(tokenizer.path, out_dir / MODEL_FILE):
        copy_file(tokenizer.path, out_dir / MODEL_FILE)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    has_json = _write_tokenizer_json(tokenizer, out_dir / "tokenizer.json")
    config = {
        # Without tokenizer.json, transformers builds its Llama tokenizer from tokenizer.model.
        "tokenizer_class": "PreTrainedTokenizerFast" if has_json else "LlamaTokenizer",
        **specials, "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072, "chat_template": CHAT_TEMPLATE}
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out_dir / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")


def load_tokenizer(model_dir: str | Path, *, vocab_size: int | None = None):
    """The tokenizer of a model directory: our SentencePiece `tokenizer.model`, else a Hugging Face
    `tokenizer.json` (dh_mlx.hf_tokenizer), else None. A directory whose tokenizer is only a custom class (code)
    is refused, naming it. With `vocab_size` (the model's), checked against it (`check_vocab`)."""
    from .hf_tokenizer import TOKENIZER_JSON, HFTokenizer, custom_tokenizer
    d = Path(model_dir)
    if (d / MODEL_FILE).exists():
        tok = Tokenizer(d / MODEL_FILE)
    elif (d / TOKENIZER_JSON).exists():
        tok = HFTokenizer(d, vocab_size=vocab_size)
    elif custom := custom_tokenizer(d):
        raise TokenizerError(f"{d}: its tokenizer is the custom class {custom}, code that dh-mlx never runs; it "
                             f"needs a {TOKENIZER_JSON} (or {MODEL_FILE}) beside the weights")
    else:
        tok = None
    if tok is not None and vocab_size is not None:
        check_vocab(tok, vocab_size)
    return tok


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """A model may have more rows than its tokenizer has pieces (padded vocabularies; generation never samples
    the extra ids), never fewer: ids past the embedding table would index outside it."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} pieces but the model's "
                             f"vocab_size is {vocab_size}; use a model with vocab_size >= {tokenizer.vocab_size} or "
                             "a smaller tokenizer")

