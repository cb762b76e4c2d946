"""Training records: JSONL reading and validation (one bad line is an error naming `file:line`, or is counted).

Records, one JSON object a line (`domain` optional everywhere; other keys are ignored):
    {"domain": "code", "text": "..."}                       pretraining text; every token is trained
    {"prompt": "...", "completion": "..."}                  loss on the completion only
    {"messages": [{"role": "user", "content": "..."}, ...]}  loss on the assistant turns only

Chat template (ours; `CHAT_TEMPLATE` in dh_mlx/tokenizer.py is the same for transformers/mlx-lm): a system or
user turn is `System: ...\\n` / `User: ...\\n`; an assistant turn is `Assistant: ` then its content and `</s>`.
Only the assistant content and its `</s>` are trained; each part is tokenized on its own, as at generation
time, where the prompt ending in `Assistant: ` is tokenized before the reply exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..files import FileKindError, regular_file

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Invalid training data; the message starts with `path:line:`."""


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str | None = None):
        self.reason, self.detail = reason, detail or reason


@dataclass
class Part:
    """A run of text within a document; `end` appends `</s>` after it."""

    text: str
    train: bool
    end: bool = False


@dataclass
class Record:
    path: Path
    line: int
    domain: str | None
    parts: list[Part]
    messages: list[dict] | None = None  # a `messages` record's turns (rendered with a model's own template)


@dataclass
class DataSummary:
    """What was read: counts per domain, and every skipped line counted by reason (nothing is dropped silently)."""

    files: int = 0
    records: int = 0
    blank_lines: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # the first few skipped lines, as `path:line: problem`
    domains: dict[str, int] = field(default_factory=dict)  # records per domain ("-" for none)
    tokens: int = 0
    long_documents: int = 0  # documents longer than one row, split across rows

    def skip(self, message: str, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def __str__(self) -> str:
        by_domain = ", ".join(f"{d} {n}" for d, n in sorted(self.domains.items()))
        out = f"{self.files} file(s), {self.records} records ({by_domain}), {self.tokens} tokens"
        if self.skipped:
            out += f"; skipped {sum(self.skipped.values())} (" + ", ".join(
                f"{r} {n}" for r, n in sorted(self.skipped.items())) + "; first: " + "; ".join(
                self.examples[:3]) + ")"
        return out


# ---- reading ---------------------------------------------------------------------------------------------
def jsonl_files(path: str | Path) -> list[Path]:
    """`path` itself, or the `.jsonl` files under a directory, in sorted order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no .jsonl files")
        return files
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    try:
        return [regular_file(path)]
    except FileKindError as e:  # a FIFO would block the read forever
        raise DataError(str(e)) from None


def _text(obj: dict, key: str, *, empty_ok: bool = False) -> str:
    if key not in obj:
        raise _Invalid(f"missing {key}", f'missing "{key}" field')
    v = obj[key]
    if not isinstance(v, str):
        raise _Invalid(f"{key} not a string", f'"{key}" must be a string, got {type(v).__name__}')
    if not v and not empty_ok:
        raise _Invalid(f"empty {key}", f'"{key}" is empty')
    return v


def _check_unicode(text: str) -> None:
    """JSON can spell a lone surrogate (\\ud800), which no UTF-8 text holds and no tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Invalid("lone surrogate", f"the text holds a lone surrogate U+{ord(text[e.start]):04X} at character "
                                         f"{e.start}") from None


def _chat_parts(messages) -> list[Part]:
    if not isinstance(messages, list) or not messages:
        raise _Invalid("invalid messages", '"messages" must be a non-empty list')
    parts = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _Invalid("invalid messages", f'messages[{k}] must be {{"role": one of {", ".join(ROLES)}, '
                                               f'"content": string}}')
        if m["role"] == "assistant":
            parts += [Part("Assistant: ", False), Part(m["content"], True, end=True)]
        else:
            parts.append(Part(f"{m['role'].capitalize()}: {m['content']}\n", False))
    if not any(p.train for p in parts):
        raise _Invalid("invalid messages", "messages hold no assistant turn (nothing to train on)")
    return parts


def _parse(obj, domains: Sequence[str] | None) -> tuple[str | None, list[Part]]:
    if not isinstance(obj, dict):
        raise _Invalid("not an object", f"expected a JSON object, got {type(obj).__name__}")
    kinds = [k for k, keys in (("text", ("text",)), ("prompt/completion", ("prompt", "completion")),
                               ("messages", ("messages",))) if any(x in obj for x in keys)]
    if len(kinds) > 1:
        raise _Invalid("ambiguous record", f"record has both {kinds[0]} and {kinds[1]} fields")
    if kinds == ["messages"]:
        parts = _chat_parts(obj["messages"])
    elif kinds == ["prompt/completion"]:
        parts = [Part(_text(obj, "prompt", empty_ok=True), False), Part(_text(obj, "completion"), True, end=True)]
    else:
        parts = [Part(_text(obj, "text"), True, end=True)]
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise _Invalid("domain not a string", f'"domain" must be a string, got {type(domain).__name__}')
    if domain is not None and domains is not None and domain not in domains:
        raise _Invalid("unknown domain", f"unknown domain {domain!r} (this model's domains: {', '.join(domains)})")
    return domain, parts


def parse_line(raw: bytes, *, first: bool = False, domains: Sequence[str] | None = None
               ) -> tuple[str | None, list[Part], list | None] | None:
    """One JSONL line: (domain, parts, messages or None), None for a blank line; `_Invalid` for a bad one.
    `first`: the file's first line, which may start with a UTF-8 byte-order mark."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise _Invalid("invalid UTF-8", f"invalid UTF-8 at byte {e.start} of the line") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Invalid("invalid JSON", f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise _Invalid("nested too deeply", "JSON nested too deeply") from None
    domain, parts = _parse(obj, domains)
    for p in parts:
        _check_unicode(p.text)
    return domain, parts, obj["messages"] if "messages" in obj else None


def read_jsonl(path: str | Path, *, domains: Sequence[str] | None = None, skip_invalid: bool = False,
               summary: DataSummary | None = None) -> Iterator[Record]:
    """Validated records of a JSONL file or directory, streamed line by line.

    `domains` (the model's `domain_routing.domains`) rejects other domain names; None accepts any. An invalid
    line raises `DataError("path:line: problem")`, or with `skip_invalid` is counted in `summary.skipped`.
    """
    summary = summary if summary is not None else DataSummary()

    def invalid(path: Path, line: int, reason: str, detail: str) -> None:
        message = f"{path}:{line}: {detail}"
        if not skip_invalid:
            raise DataError(message)
        summary.skip(message, reason)

    for path in jsonl_files(path):
        summary.files += 1
        seen = 0
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    parsed = parse_line(raw, first=line_no == 1, domains=domains)
                except _Invalid as e:
                    seen += 1
                    invalid(path, line_no, e.reason, e.detail)
                    continue
                if parsed is None:
                    summary.blank_lines += 1
                    continue
                seen += 1
                domain, parts, messages = parsed
                summary.records += 1
                summary.domains[domain or "-"] = summary.domains.get(domain or "-", 0) + 1
                yield Record(path, line_no, domain, parts, messages)
        if not seen:
            invalid(path, 1, "empty file", "empty file (no JSONL records)")


def record_texts(record: Record) -> list[str]:
    """The texts of a record (for tokenizer training)."""
    return [p.text for p in record.parts if p.text]


def chat_text(messages: list[dict], bos: str = "<s>", eos: str = "</s>") -> str:
    """A conversation as text under our template (what `CHAT_TEMPLATE` renders)."""
    return bos + "".join(p.text + (eos if p.end else "") for p in _chat_parts(messages))
