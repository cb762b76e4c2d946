"""Training data: tokenizing records, packing documents into fixed-length rows, the split, resumable batches.

Records are read and validated by `records.py` (re-exported here). Documents are `<s> tokens </s>`,
concatenated in a seeded order and cut into rows of `seq_len + 1` tokens
(inputs `row[:-1]`, targets `row[1:]`); the tail row is padded. Rows are packed, not padded per document, so no
compute is spent on padding; instead every token carries a segment id (its document's index within the row,
-1 on padding) and the trainer must use a block-diagonal causal mask, `seg[q] == seg[k] and k <= q`: tokens
never attend across documents. RoPE is relative, so positions need not restart per document. The loss mask is 1
where the target is a trained token of the same document as the input (never on padding, never on a `<s>`,
never on a prompt), so no document is asked to predict the next one. A document longer than a row continues at
the start of the next row, without the earlier context.

Validation documents are held out by document (a seeded `val_fraction` of them), before packing. This module
packs in memory; `prepared.py` reads the same rows from prepared shards (`dh-mlx data prepare`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .records import (ROLES, DataError, DataSummary, Part, Record, chat_text, jsonl_files,  # noqa: F401
                      read_jsonl, record_texts)


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
    lengths, flags = [len(ids)], [False]
    for p in record.parts:
        t = tokenizer.encode(p.text) + ([tokenizer.eos_id] if p.end else [])
        ids += t
        lengths.append(len(t))
        flags.append(p.train)
    # (fromiter and repeat: a third of the per-token cost of converting lists, which `data prepare` pays per token)
    return Document(np.fromiter(ids, np.int32, len(ids)), np.repeat(np.array(flags, bool), lengths), domain)


class Batch(NamedTuple):
    inputs: np.ndarray       # [B, T] int32
    targets: np.ndarray      # [B, T] int32
    loss_mask: np.ndarray    # [B, T] float32
    segment_ids: np.ndarray  # [B, T] int32: document index within the row, -1 on padding
    domain_ids: np.ndarray   # [B, T] int32: -1 for no domain (and on padding)


def row_batch(tokens: np.ndarray, train: np.ndarray, segments: np.ndarray, domains: np.ndarray) -> Batch:
    """A batch of packed rows (`[B, T+1]` each): inputs and targets, and the loss mask on trained targets of
    the input's own document."""
    mask = train[:, 1:] & (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] >= 0)
    return Batch(tokens[:, :-1], tokens[:, 1:], mask.astype(np.float32), segments[:, :-1], domains[:, :-1])


def drop_domains(b: Batch, p: float, seed: int, step: int, part: tuple[int, int] = (0, 1)) -> Batch:
    """Hide the domain of a seeded random share `p` of the rows (deterministic per step, so resume matches);
    with `part=(rank, ranks)`, `b` is that rank's share of a global batch and gets its share of the draws."""
    if p <= 0:
        return b
    n = b.domain_ids.shape[0]
    hide = (np.random.default_rng([seed, step, 7]).random(n * part[1]) < p)[part[0] * n:(part[0] + 1) * n]
    return b._replace(domain_ids=np.where(hide[:, None], -1, b.domain_ids))


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
        return row_batch(self.tokens[rows], self.train[rows], self.segments[rows], self.domains[rows])

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
    train, valid = split_order(len(documents), val_fraction, seed)
    return [documents[i] for i in train], [documents[i] for i in valid]


def split_order(n: int, val_fraction: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) document indices: a seeded permutation of `n` documents, the first `val_fraction`
    of it held out; each part in the order it is packed."""
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = 0 if val_fraction == 0 or n < 2 else max(1, round(val_fraction * n))
    return order[n_val:], order[:n_val]


# ---- batches ---------------------------------------------------------------------------------------------
EXACT_ROWS = 1 << 24  # up to this many rows an epoch's order is one permutation (8 bytes a row); beyond, it is
BLOCK_ROWS = 1 << 20  # a permutation of blocks of this many rows, each shuffled within: memory stays bounded


class BatchIterator:
    """Batches of `batch_size` rows; `state_dict()`/`load_state_dict()` resume at exactly the next batch.

    Training (`repeat=True`): endless epochs, each a fresh seeded permutation of the rows, the remainder that does
    not fill a batch left for later epochs. Evaluation (`shuffle=False, repeat=False`): one pass in order, the
    last batch filled with padding rows whose loss mask is 0 (shapes stay fixed for `mx.compile`).
    `part=(rank, ranks)`: each batch is a global batch of which this iterator reads and returns only the rank's
    contiguous share of rows (data-parallel ranks read disjoint rows). Rows that can count their tokens by
    source (`seen_names`, `seen(rows)`: prepared data) are counted over the global batch in `seen`.
    """

    seen_key = "domain_tokens"

    def __init__(self, packed, batch_size: int, *, seed: int = 0, shuffle: bool = True, repeat: bool = True,
                 part: tuple[int, int] = (0, 1)):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if batch_size % part[1]:
            raise ValueError(f"batch_size {batch_size} does not split over {part[1]} ranks")
        if repeat and len(packed) < batch_size:
            raise DataError(f"the data makes {len(packed)} sequences of {packed.seq_len + 1} tokens, fewer than "
                            f"one batch of {batch_size}; use more data, a smaller batch or a shorter seq_len")
        self.packed, self.batch_size, self.shuffle, self.repeat = packed, batch_size, shuffle, repeat
        self.seed, self.epoch, self.index, self.part = seed, 0, 0, part
        self.seen = np.zeros(len(getattr(packed, "seen_names", ())), np.int64)
        self._order: tuple | None = None
        self._fingerprint: str | None = None

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.packed)
        return n // self.batch_size if self.repeat else math.ceil(n / self.batch_size)

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        """The rows at positions `lo..hi-1` of this epoch's order."""
        n = len(self.packed)
        if not self.shuffle:
            return np.arange(lo, hi)
        if n <= EXACT_ROWS:
            if self._order is None or self._order[0] != self.epoch:
                self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(n))
            return self._order[1][lo:hi]
        full = n // BLOCK_ROWS  # a last, partial block stays last
        out = []
        for q in range(lo // BLOCK_ROWS, (hi - 1) // BLOCK_ROWS + 1):
            key = (self.epoch, q)
            if self._order is None or self._order[0] != key:
                b = int(np.random.default_rng([self.seed, self.epoch, 1]).permutation(full)[q]) if q < full else q
                size = min(BLOCK_ROWS, n - b * BLOCK_ROWS)
                inner = np.random.default_rng([self.seed, self.epoch, 2, b]).permutation(size)
                self._order = (key, b * BLOCK_ROWS + inner)
            a, z = max(lo, q * BLOCK_ROWS) - q * BLOCK_ROWS, min(hi, (q + 1) * BLOCK_ROWS) - q * BLOCK_ROWS
            out.append(self._order[1][a:z])
        return np.concatenate(out)

    def _batch(self, rows: np.ndarray) -> Batch:
        rank, ranks = self.part
        share = self.batch_size // ranks
        rows = rows[rank * share:(rank + 1) * share]
        batch = self.packed.batch(rows)
        short = share - len(rows)
        if short:
            batch = Batch(*(np.pad(a, ((0, short), (0, 0)), constant_values=v)
                            for a, v in zip(batch, (self.packed.pad_id, self.packed.pad_id, 0, -1, -1))))
        return batch

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        if self.index >= self.batches_per_epoch:
            if not self.repeat:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
        lo = self.index * self.batch_size
        rows = self._rows(lo, min(lo + self.batch_size, len(self.packed)))
        self.index += 1
        if self.seen.size:
            self.seen += self.packed.seen(rows)
        return self._batch(rows)

    def batch_at(self, i: int) -> Batch:
        """The `i`-th batch of the first pass, without moving the iterator (validation: each rank its own)."""
        lo = i * self.batch_size
        return self._batch(self._rows(lo, min(lo + self.batch_size, len(self.packed))))

    def tokens_seen(self) -> dict[str, int]:
        """Tokens of the rows drawn so far, by source (domain label, or mixture component); {} if not counted."""
        return {name: int(n) for name, n in zip(getattr(self.packed, "seen_names", ()), self.seen)
                if n or name != "-"}

    def state_dict(self) -> dict:
        """Where the iterator stands (JSON-serialisable); `data` fingerprints the rows."""
        if self._fingerprint is None:
            self._fingerprint = self.packed.fingerprint()
        state = {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                 "data": self._fingerprint}
        return {**state, "seen": self.seen.tolist()} if self.seen.size else state

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
        if self.seen.size and len(state.get("seen", ())) == self.seen.size:
            self.seen = np.asarray(state["seen"], np.int64)
        self._order = None


# ---- the whole pipeline ----------------------------------------------------------------------------------
@dataclass
class Dataset:
    train: Packed
    valid: Packed
    summary: DataSummary

    def train_batches(self, batch_size: int, *, seed: int = 0, part: tuple[int, int] = (0, 1)) -> BatchIterator:
        return BatchIterator(self.train, batch_size, seed=seed, part=part)

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
    if hasattr(dataset, "describe"):  # a mixture
        return dataset.describe(path, seq_len)
    text = (f"data: {path}: {dataset.summary}; {len(dataset.train)} training and {len(dataset.valid)} validation "
            f"sequences of {seq_len} tokens")
    if not len(dataset.valid):
        text += (f"\nwarning: {path}: no validation split (too few documents for val_fraction {val_fraction}); "
                 "no validation loss will be reported")
    return text
