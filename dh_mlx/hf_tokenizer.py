"""Hugging Face tokenizers (`tokenizer.json`, e.g. the byte-level BPE DeepSeek releases ship) through the
`tokenizers` library, with the special tokens and chat template of `tokenizer_config.json` and the end-of-turn
ids of `generation_config.json`. Same interface as dh_mlx.tokenizer.Tokenizer.

Unlike our SentencePiece tokenizer, text that spells a special token encodes to it, as transformers does.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import os
from pathlib import Path
from typing import Any, Iterable

from . import chat
from .files import FileKindError, copy_file, read_json, read_text, same_file

TOKENIZER_JSON = "tokenizer.json"


class HFTokenizerError(ValueError):
    """A tokenizer directory dh-mlx cannot read; the message names the file and what is missing."""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (character -> byte): printable bytes stand for themselves, the other 68 for
    the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(others)}}


#: Ids a tokenizer may have when the model's vocabulary is not known: 30x the largest released vocabulary.
MAX_IDS = 1 << 22


def _read_json(path: Path) -> dict:
    try:
        data = read_json(path, "tokenizer")
    except FileKindError as e:
        raise HFTokenizerError(str(e)) from None
    except (OSError, ValueError) as e:
        raise HFTokenizerError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise HFTokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


@contextlib.contextmanager
def _rust_panics_unprinted():
    """File descriptor 2 closed to the tokenizers library while it runs: a panic of its (a regex search past its
    retry limit) writes a Rust backtrace there before it becomes a Python exception, which we report in one
    line instead."""
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def check_length(tokenizer, size: int, limit: int | None) -> None:
    """Refuse `size` bytes of text that need more than `limit` tokens whatever they are: each token stands for
    at most `tokenizer.max_token_bytes` bytes. (Checked before tokenizing: a huge text is never tokenized.)"""
    if limit is not None and size > limit * tokenizer.max_token_bytes:
        raise ValueError(f"the text has {size:,} bytes, more than {limit:,} tokens can hold (the model's context; "
                         f"a token of this tokenizer stands for at most {tokenizer.max_token_bytes} bytes)")


class HFTokenizer:
    def __init__(self, model_dir: str | Path, *, vocab_size: int | None = None):
        """`vocab_size` (the model's, when known) bounds the ids before any table of them is built."""
        from tokenizers import Tokenizer as Fast

        d = Path(model_dir)
        self.path = d / TOKENIZER_JSON
        try:
            self.tk = Fast.from_str(read_text(self.path, "tokenizer"))
        except FileKindError as e:
            raise HFTokenizerError(str(e)) from None
        except Exception as e:  # the library raises its own Exception types on malformed files
            raise HFTokenizerError(f"{self.path}: not a tokenizers file ({str(e).splitlines()[0][:200]})") from None
        bound = vocab_size if vocab_size is not None else MAX_IDS
        if self.vocab_size > bound:  # before the per-id tables below are built
            raise HFTokenizerError(f"{self.path}: the tokenizer has ids up to {self.vocab_size - 1} but the model's "
                                   f"vocab_size is {bound}" if vocab_size is not None else
                                   f"{self.path}: ids up to {self.vocab_size - 1}; at most {MAX_IDS} are read")
        config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        # the special-token strings a chat template may use (transformers passes them all)
        self.specials = {k: _token_text(v) for k, v in config.items() if k.endswith("_token") and _token_text(v)}
        extra = config.get("additional_special_tokens")
        self.specials["additional_special_tokens"] = [_token_text(t) for t in extra] if isinstance(extra, list) else []
        self.chat_template = config.get("chat_template")
        self.template_file = d / "tokenizer_config.json"
        if (d / "chat_template.jinja").exists():
            self.template_file = d / "chat_template.jinja"  # newer transformers keep the template in its own file
            try:
                self.chat_template = read_text(d / "chat_template.jinja", "template")
            except FileKindError as e:
                raise HFTokenizerError(str(e)) from None
        if isinstance(self.chat_template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default")
        eos = [self._id(self.eos_token)]
        gen = d / "generation_config.json"
        if gen.exists():  # the ids that end a turn (a list in many releases)
            listed = _read_json(gen).get("eos_token_id")
            eos = (listed if isinstance(listed, list) else [listed]) + eos
        self.eos_ids = tuple(dict.fromkeys(i for i in eos if isinstance(i, int)))
        decoder = self.tk.decoder
        self.byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()
        added = self.tk.get_added_tokens_decoder()
        alphabet = _byte_alphabet()
        # Bytes each id adds to decoded text: None for a special token (it decodes to nothing), an added
        # token's own text, else (byte-level vocabularies) its characters mapped back to bytes.
        self._bytes = [None if i in added and added[i].special else added[i].content.encode() if i in added
                       else self._piece_bytes(i, alphabet) for i in range(self.vocab_size)] if self.byte_level else None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    def _piece_bytes(self, i: int, alphabet: dict[str, int]) -> bytes:
        piece = self.tk.id_to_token(i)
        if piece is None:  # a hole in the ids
            return b""
        if all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        return self.tk.decode([i], skip_special_tokens=False).encode()

    @property
    def vocab_size(self) -> int:
        """One past the largest id (ids may have holes)."""
        return max(self.tk.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def pad_id(self) -> int | None:
        """The pad token's id; without one the eos id (what padded positions hold is masked out anyway)."""
        pad = self._id(self.pad_token)
        return pad if pad is not None else self.eos_id

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id stands for in decoded text (None: a special token, which decodes to nothing)."""
        if self._bytes is not None:
            return list(self._bytes)
        added = self.tk.get_added_tokens_decoder()
        return [None if i in added and added[i].special else self.tk.decode([i], skip_special_tokens=False).encode()
                for i in range(self.vocab_size)]

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for (so a text of n bytes needs >= n / this tokens)."""
        if self._bytes is not None:
            return max(len(b) for b in self._bytes if b)
        return max(len(t.encode("utf-8")) for t in self.tk.get_vocab(with_added_tokens=True))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, limit: int | None = None) -> list[int]:
        """Token ids of `text`; with `limit`, a text that cannot fit in that many tokens is refused first."""
        try:
            check_length(self, len(text.encode("utf-8")), limit)
        except UnicodeEncodeError as e:
            raise HFTokenizerError(f"the text holds U+{ord(text[e.start]):04X} at character {e.start}: a lone "
                                   "surrogate, which no UTF-8 text can hold") from None
        try:
            with _rust_panics_unprinted():
                ids = self.tk.encode(text, add_special_tokens=False).ids
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the library's own errors, and its panics (a pre-tokenizer regex that gave up)
            raise HFTokenizerError(f"{self.path}: tokenizing failed: {str(e).splitlines()[0][:200]}") from None
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + (
            [self.eos_id] if eos and self.eos_id is not None else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(int(i))

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_args) -> str:
        """The template's text, as transformers' `apply_chat_template(..., tokenize=False)`: `tools` (JSON
        schemas) and `template_args` (the template's switches, e.g. `enable_thinking=False`) passed through."""
        if not self.chat_template:
            raise HFTokenizerError(f"{self.path.parent}: tokenizer_config.json has no chat_template")
        return chat.render(self.chat_template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           where=f"{self.template_file}: chat template",
                           **{**self.specials, "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                              **template_args})

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, limit: int | None = None,
                    **template_args) -> list[int]:
        """Ids of the chat template's text (its special tokens spelled out, as transformers tokenizes it);
        `template_args` as `apply_chat_template`'s (tools included); `limit`: see `encode`."""
        return self.encode(self.apply_chat_template(chat.check_messages(messages, tools=True),
                                                    add_generation_prompt=add_generation_prompt, **template_args),
                           limit=limit)

    FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

    def write_files(self, out_dir: Path) -> None:
        """Copy the tokenizer's files (those present) into `out_dir`."""
        for name in self.FILES:
            src = self.path.parent / name
            if src.exists() and not same_file(src, out_dir / name):
                copy_file(src, out_dir / name)

    def stream_decoder(self):
        return ByteStreamDecoder(self._bytes) if self.byte_level else TextStreamDecoder(self)


class ByteStreamDecoder:
    """Text of a growing id sequence, one finished piece at a time: bytes of a character split across tokens
    are held back until the character is whole, so no piece ever ends in half a UTF-8 character."""

    def __init__(self, piece_bytes: list[bytes | None]):
        self._bytes = piece_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        piece = self._bytes[int(token_id)] if 0 <= int(token_id) < len(self._bytes) else b""
        return self._utf8.decode(piece) if piece is not None else ""

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class TextStreamDecoder:
    """For vocabularies that are not byte-level: decode the whole sequence and hand out what it adds, holding
    back text that ends in U+FFFD (a character whose bytes have not all arrived)."""

    def __init__(self, tokenizer: HFTokenizer):
        self.tokenizer, self.ids, self.done = tokenizer, [], 0

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.done = text[self.done:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)[self.done:]
        self.ids, self.done = [], 0
        return text


def custom_tokenizer(model_dir: Path) -> str | None:
    """The custom tokenizer class a directory's tokenizer_config.json names through `auto_map` (code that would
    have to run, which dh-mlx never does), or None."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    auto = _read_json(path).get("auto_map") or {}
    ref = auto.get("AutoTokenizer") if isinstance(auto, dict) else None
    if isinstance(ref, list):
        ref = next((r for r in ref if r), None)
    return ref if isinstance(ref, str) else None
