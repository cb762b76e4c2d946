"""Training data: JSONL reading and validation, tokenizing, packing into fixed-length rows, resumable batches.

Records, one JSON object a line (`domain` optional everywhere; other keys are ignored):
    {"domain": "code", "text": "..."}                       pretraining text; every token is trained
    {"prompt": "...", "completion": "..."}                  loss on the completion only
    {"messages": [{"role": "user", "content": "..."}, ...]}  loss on the assistant turns only

Chat template (ours; `CHAT_TEMPLATE` in dh_mlx/tokenizer.py is the same for transformers/mlx-lm): a system or
user turn is `System: ...\\n` / `User: ...\\n`; an assistant turn is `Assistant: ` then its content and `</s>`.
Only the assistant content and its `</s>` are trained; each part is tokenized on its own, as at generation
time, where the prompt ending in `Assistant: ` is tokenized before the reply exists.

Documents are `<s> tokens </s>`, concatenated in a seeded order and cut into rows of `seq_len + 1` tokens
(inputs `row[:-1]`, targets `row[1:]`); the tail row is padded. Rows are packed, not padded per document, so no
compute is spent on padding; instead every token carries a segment id (its document's index within the row,
-1 on padding) and the trainer must use a block-diagonal causal mask, `seg[q] == seg[k] and k <= q`: tokens
never attend across documents. RoPE is relative, so positions need not restart per document. The loss mask is 1
where the target is a trained token of the same document as the input (never on padding, never on a `<s>`,
never on a prompt), so no document is asked to predict the next one. A document longer than a row continues at
the start of the next row, without the earlier context.

Validation documents are held out by document (a seeded `val_fraction` of them), before packing.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

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
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    invalid(path, line_no, "invalid UTF-8", f"invalid UTF-8 at byte {e.start} of the line")
                    seen += 1
                    continue
                if not line.strip():
                    summary.blank_lines += 1
                    continue
                seen += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    invalid(path, line_no, "invalid JSON", f"invalid JSON: {e.msg} (column {e.colno})")
                    continue
                except RecursionError:
                    invalid(path, line_no, "nested too deeply", "JSON nested too deeply")
                    continue
                try:
                    domain, parts = _parse(obj, domains)
                    for p in parts:
                        _check_unicode(p.text)
                except _Invalid as e:
                    invalid(path, line_no, e.reason, e.detail)
                    continue
                summary.records += 1
                summary.domains[domain or "-"] = summary.domains.get(domain or "-", 0) + 1
                yield Record(path, line_no, domain, parts, obj["messages"] if "messages" in obj else None)
        if not seen:
            invalid(path, 1, "empty file", "empty file (no JSONL records)")


def record_texts(record: Record) -> list[str]:
    """The texts of a record (for tokenizer training)."""
    return [p.text for p in record.parts if p.text]


def chat_text(messages: list[dict], bos: str = "<s>", eos: str = "</s>") -> str:
    """A conversation as text under our template (what `CHAT_TEMPLATE` renders)."""
    return bos + "".join(p.text + (eos if p.end else "") for p in _chat_parts(messages))


# ---- tokenizing and packing --------------------------------------------------------------------------------
@dataclass
class Document:
    ids: np.ndarray    # [L] int32: <s> ... </s>
    train: np.ndarray  # [L] bool: the token is trained when it is a target
    domain: int        # index into the model's domains; -1 for none


def _templated(record: Record, tokenizer) -> tuple[list[int], list[bool]]:
    """A `messages` record under the tokenizer's own chat template: the whole conversation's ids, with the
    tokens each assistant turn adds to the conversation before it trained (what the model will generate)."""
    ms = record.messages
    ids = tokenizer.encode_chat(ms, add_generation_prompt=False)
    train = [False] * len(ids)
    for i, m in enumerate(ms):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.encode_chat(ms[:i], add_generation_prompt=True)) if i else 0
        upto = tokenizer.encode_chat(ms[: i + 1], add_generation_prompt=False)
        end = len(upto)
        if upto != ids[:end]:
            raise DataError(f"{record.path}:{record.line}: the model's chat template renders turn {i} differently "
                            "once later turns follow; split the conversation into one record per reply")
        train[start:end] = [True] * (end - start)
    return ids, train


def tokenize(record: Record, tokenizer, domains: Sequence[str] | None = None) -> Document:
    """`<s>` + each part's tokens (+ `</s>` where a part ends a turn), with the trained flag per token; a
    `messages` record with a tokenizer that has its own chat template (a release's) goes through it."""
    domain = domains.index(record.domain) if domains is not None and record.domain is not None else -1
    if record.messages is not None and getattr(tokenizer, "chat_template", None):
        ids, train = _templated(record, tokenizer)
        return Document(np.asarray(ids, np.int32), np.asarray(train, bool), domain)
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []  # some vocabularies have no BOS
    train = [False] * len(ids)
    for p in record.parts:
        t = tokenizer.encode(p.text) + ([tokenizer.eos_id] if p.end else [])
        ids += t
        train += [p.train] * len(t)
    return Document(np.asarray(ids, np.int32), np.asarray(train, bool), domain)


class Batch(NamedTuple):
    inputs: np.ndarray       # [B, T] int32
    targets: np.ndarray      # [B, T] int32
    loss_mask: np.ndarray    # [B, T] float32
    segment_ids: np.ndarray  # [B, T] int32: document index within the row, -1 on padding
    domain_ids: np.ndarray   # [B, T] int32: -1 for no domain (and on padding)


@dataclass
class Packed:
    """Documents cut into rows of `seq_len + 1` tokens; each array is `[N, T+1]`."""

    tokens: np.ndarray    # int32
    train: np.ndarray     # bool
    segments: np.ndarray  # int32
    domains: np.ndarray   # int32
    pad_id: int = 0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def batch(self, rows: np.ndarray) -> Batch:
        tok, seg = self.tokens[rows], self.segments[rows]
        mask = self.train[rows][:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
        return Batch(tok[:, :-1], tok[:, 1:], mask.astype(np.float32), seg[:, :-1], self.domains[rows][:, :-1])

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for a in (self.tokens, self.train, self.segments, self.domains):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def pack(documents: Sequence[Document], seq_len: int, pad_id: int = 0) -> Packed:
    """Concatenate `documents` in order and cut into rows of `seq_len + 1`, padding the last row."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    W = seq_len + 1
    if not documents:
        z = np.zeros((0, W), np.int32)
        return Packed(z, z.astype(bool), z, z, pad_id)
    lengths = np.array([len(d.ids) for d in documents])
    n = int(lengths.sum())
    size = math.ceil(n / W) * W
    tokens = np.full(size, pad_id, np.int32)
    train = np.zeros(size, bool)
    doc = np.full(size, -1, np.int64)
    domains = np.full(size, -1, np.int32)
    tokens[:n] = np.concatenate([d.ids for d in documents])
    train[:n] = np.concatenate([d.train for d in documents])
    doc[:n] = np.repeat(np.arange(len(documents)), lengths)
    domains[:n] = np.repeat(np.array([d.domain for d in documents], np.int32), lengths)
    doc = doc.reshape(-1, W)
    # Number documents from 0 within each row (they are contiguous and increasing); padding stays -1.
    segments = np.where(doc >= 0, doc - doc[:, :1], -1).astype(np.int32)
    return Packed(tokens.reshape(-1, W), train.reshape(-1, W), segments, domains.reshape(-1, W), pad_id)


def split_documents(documents: Sequence[Document], val_fraction: float = 0.05, seed: int = 0
                    ) -> tuple[list[Document], list[Document]]:
    """(train, validation): a seeded shuffle of the documents, the first `val_fraction` of it held out."""
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(documents))
    n_val = 0 if val_fraction == 0 or len(documents) < 2 else max(1, round(val_fraction * len(documents)))
    return [documents[i] for i in order[n_val:]], [documents[i] for i in order[:n_val]]


# ---- batches ---------------------------------------------------------------------------------------------
class BatchIterator:
    """Batches of `batch_size` rows; `state_dict()`/`load_state_dict()` resume at exactly the next batch.

    Training (`repeat=True`): endless epochs, each a fresh seeded permutation of the rows, the remainder that does
    not fill a batch left for later epochs. Evaluation (`shuffle=False, repeat=False`): one pass in order, the
    last batch filled with padding rows whose loss mask is 0 (shapes stay fixed for `mx.compile`).
    """

    def __init__(self, packed: Packed, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 repeat: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if repeat and len(packed) < batch_size:
            raise DataError(f"the data makes {len(packed)} sequences of {packed.seq_len + 1} tokens, fewer than "
                            f"one batch of {batch_size}; use more data, a smaller batch or a shorter seq_len")
        self.packed, self.batch_size, self.shuffle, self.repeat = packed, batch_size, shuffle, repeat
        self.seed, self.epoch, self.index = seed, 0, 0
        self._order: tuple[int, np.ndarray] | None = None
        self._fingerprint: str | None = None

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.packed)
        return n // self.batch_size if self.repeat else math.ceil(n / self.batch_size)

    def _rows(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.packed)
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._order = (self.epoch, order)
        return self._order[1]

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        if self.index >= self.batches_per_epoch:
            if not self.repeat:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._rows()[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        batch = self.packed.batch(rows)
        short = self.batch_size - len(rows)
        if short:
            batch = Batch(*(np.pad(a, ((0, short), (0, 0)), constant_values=v)
                            for a, v in zip(batch, (self.packed.pad_id, self.packed.pad_id, 0, -1, -1))))
        return batch

    def state_dict(self) -> dict:
        """Where the iterator stands (JSON-serialisable); `data` fingerprints the rows."""
        if self._fingerprint is None:
            self._fingerprint = self.packed.fingerprint()
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "data": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "index", "seed"} - set(state)
        if missing:
            raise DataError(f"data iterator state lacks {', '.join(sorted(missing))}")
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise DataError(f"this run was saved with batch_size {state['batch_size']}, not {self.batch_size}; "
                            "resume with the same batch size")
        if "data" in state and state["data"] != self.state_dict()["data"]:
            raise DataError("the training data differs from the data this run was saved with (its packed rows "
                            "have another fingerprint); resume with the same data, tokenizer, seq_len and seed")
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
        self._order = None


# ---- the whole pipeline ----------------------------------------------------------------------------------
@dataclass
class Dataset:
    train: Packed
    valid: Packed
    summary: DataSummary

    def train_batches(self, batch_size: int, *, seed: int = 0) -> BatchIterator:
        return BatchIterator(self.train, batch_size, seed=seed)

    def valid_batches(self, batch_size: int) -> BatchIterator:
        return BatchIterator(self.valid, batch_size, shuffle=False, repeat=False)


def load_dataset(path: str | Path, tokenizer, *, seq_len: int, domains: Sequence[str] | None = None,
                 val_fraction: float = 0.05, seed: int = 0, skip_invalid: bool = False,
                 as_domain: str | None = None) -> Dataset:
    """Read, validate, tokenize, split (by document) and pack a JSONL file or directory.

    `tokenizer` needs `encode`, `bos_id`, `eos_id` and `pad_id` (a `dh_mlx.tokenizer.Tokenizer`); `domains` is
    the model's domains in id order (None: domain labels are accepted and not used, ids are -1). With
    `as_domain` (one of `domains`), every record is that domain's, whatever its own label.
    """
    summary = DataSummary()
    read = None if as_domain else domains
    documents = [tokenize(r, tokenizer, read)
                 for r in read_jsonl(path, domains=read, skip_invalid=skip_invalid, summary=summary)]
    if as_domain:
        documents = [Document(d.ids, d.train, list(domains).index(as_domain)) for d in documents]
    if not documents:
        raise DataError(f"{path}: no valid records" + (f" ({summary})" if summary.skipped else ""))
    summary.tokens = sum(len(d.ids) for d in documents)
    summary.long_documents = sum(len(d.ids) > seq_len + 1 for d in documents)
    train, valid = split_documents(documents, val_fraction, seed)
    return Dataset(pack(train, seq_len, tokenizer.pad_id), pack(valid, seq_len, tokenizer.pad_id), summary)


def unigram_entropy(packed: Packed) -> float:
    """Entropy (nats/token) of the trained target tokens' unigram distribution: the loss of a model that knows
    only token frequencies, a baseline every trained model must beat."""
    b = packed.batch(np.arange(len(packed)))
    counts = np.bincount(b.targets[b.loss_mask > 0])
    p = counts[counts > 0] / counts.sum() if counts.size else np.ones(1)
    return float(-(p * np.log(p)).sum())


def describe_dataset(path: str | Path, dataset: Dataset, seq_len: int, val_fraction: float) -> str:
    """What `train` and `lora` say of their data, with a warning when there is no validation split."""
    text = (f"data: {path}: {dataset.summary}; {len(dataset.train)} training and {len(dataset.valid)} validation "
            f"sequences of {seq_len} tokens")
    if not len(dataset.valid):
        text += (f"\nwarning: {path}: no validation split (too few documents for val_fraction {val_fraction}); "
                 "no validation loss will be reported")
    return text
