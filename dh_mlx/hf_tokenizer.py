"""Hugging Face tokenizers (`tokenizer.json`, e.g. the byte-level BPE DeepSeek releases ship) through the
`tokenizers` library, with the special tokens and chat template of `tokenizer_config.json` and the end-of-turn
ids of `generation_config.json`. Same interface as dh_mlx.tokenizer.Tokenizer.

Unlike our SentencePiece tokenizer, text that spells a special token encodes to it, as transformers does.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterable

from . import chat

TOKENIZER_JSON = "tokenizer.json"


class HFTokenizerError(ValueError):
    """A tokenizer directory dh-mlx cannot read; the message names the file and what is missing."""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (character -> byte): printable bytes stand for themselves, the other 68 for
    the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFTokenizerError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise HFTokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


class HFTokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as Fast

        d = Path(model_dir)
        self.path = d / TOKENIZER_JSON
        try:
            self.tk = Fast.from_file(str(self.path))
        except Exception as e:  # the library raises its own Exception types on malformed files
            raise HFTokenizerError(f"{self.path}: not a tokenizers file ({str(e).splitlines()[0][:200]})") from None
        config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        # the special-token strings a chat template may use (transformers passes them all)
        self.specials = {k: _token_text(v) for k, v in config.items() if k.endswith("_token") and _token_text(v)}
        extra = config.get("additional_special_tokens")
        self.specials["additional_special_tokens"] = [_token_text(t) for t in extra] if isinstance(extra, list) else []
        self.chat_template = config.get("chat_template")
        if (d / "chat_template.jinja").is_file():  # newer transformers keep the template in its own file
            self.chat_template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(self.chat_template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default")
        eos = [self._id(self.eos_token)]
        gen = d / "generation_config.json"
        if gen.is_file():  # the ids that end a turn (a list in many releases)
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

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
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
                           **{**self.specials, "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                              **template_args})

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, **template_args
                    ) -> list[int]:
        """Ids of the chat template's text (its special tokens spelled out, as transformers tokenizes it);
        `template_args` as `apply_chat_template`'s (tools included)."""
        return self.encode(self.apply_chat_template(chat.check_messages(messages, tools=True),
                                                    add_generation_prompt=add_generation_prompt, **template_args))

    FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

    def write_files(self, out_dir: Path) -> None:
        """Copy the tokenizer's files (those present) into `out_dir`."""
        for name in self.FILES:
            src = self.path.parent / name
            if src.is_file() and src.resolve() != (out_dir / name).resolve():
                (out_dir / name).write_bytes(src.read_bytes())

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
