"""Training data from prepared shards: `data.py`'s packing computed from the document lengths alone and read row
by row through memory maps; domain mixtures; and `open_dataset`, what `train`, `lora`, `domains add` and the
twin's trainer read. numpy only.

Start-up reads the documents' lengths and labels (10 bytes a document) and keeps the packing order and its
offsets (12 to 16 bytes a document); a batch reads only its rows' tokens. The order is data.py's exactly (the
same seeded split, the same rows, the same batches), so a run gives the losses it gave from in-memory data.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import Batch, BatchIterator, row_batch, split_order
from .records import DataError, DataSummary
from .shards import PreparedData, is_prepared, read_manifest, tokenizer_digest, WORK


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


class ShardRows:
    """Documents `docs` of a prepared directory, in that order, concatenated and cut into rows of `seq_len + 1`
    tokens (the last padded): `data.pack`'s rows, read on demand."""

    def __init__(self, data: PreparedData, docs: np.ndarray, lengths: np.ndarray, labels: np.ndarray,
                 domain_of_label: np.ndarray, seq_len: int, pad_id: int, key: str):
        self.data, self.docs, self.labels, self.domain_of_label = data, docs, labels, domain_of_label
        self.W, self.pad_id, self.key = seq_len + 1, pad_id, key
        self.cum = np.zeros(len(docs) + 1, np.int64)
        np.cumsum(lengths, out=self.cum[1:])
        self.seen_names = [*data.labels, "-"]

    def __len__(self) -> int:
        return math.ceil(int(self.cum[-1]) / self.W)

    @property
    def seq_len(self) -> int:
        return self.W - 1

    def pieces(self, r: int):
        """(position in `docs`, start, stop within the document, column) of each document piece in row `r`."""
        a = r * self.W
        b = min(a + self.W, int(self.cum[-1]))
        j = int(np.searchsorted(self.cum, a, side="right")) - 1
        while j < len(self.docs) and self.cum[j] < b:
            lo, hi = max(a, int(self.cum[j])), min(b, int(self.cum[j + 1]))
            yield j, lo - int(self.cum[j]), hi - int(self.cum[j]), lo - a
            j += 1

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = len(idx)
        tok = np.full((n, self.W), self.pad_id, np.int32)
        train = np.zeros((n, self.W), bool)
        seg, dom = np.full((n, self.W), -1, np.int32), np.full((n, self.W), -1, np.int32)
        for i, r in enumerate(idx):
            first = None
            for j, s, e, at in self.pieces(int(r)):
                first = j if first is None else first
                doc = int(self.docs[j])
                tok[i, at:at + e - s], train[i, at:at + e - s] = self.data.read(doc, s, e)
                seg[i, at:at + e - s] = j - first
                dom[i, at:at + e - s] = self.domain_of_label[self.labels[doc]]
        return tok, train, seg, dom

    def batch(self, idx: np.ndarray) -> Batch:
        return row_batch(*self.rows(idx))

    def seen(self, idx: np.ndarray) -> np.ndarray:
        """Tokens of rows `idx` by domain label (`seen_names`), from the lengths alone."""
        counts = np.zeros(len(self.seen_names), np.int64)
        for r in idx:
            for j, s, e, _ in self.pieces(int(r)):
                counts[self.labels[int(self.docs[j])]] += e - s  # (label -1 is the last, "-")
        return counts

    def fingerprint(self) -> str:
        return self.key


class InterleavedRows:
    """Several row sets as one, taking a row from each in turn (those not yet exhausted): a mixture's
    validation rows, so that the first batches cover every component."""

    def __init__(self, parts: list):
        self.parts, self.lengths = parts, [len(p) for p in parts]
        self.pad_id, self.seq_len = parts[0].pad_id, parts[0].seq_len

    def __len__(self) -> int:
        return sum(self.lengths)

    def locate(self, i: int) -> tuple[int, int]:
        done = 0
        for level in sorted(set(self.lengths)):
            active = [k for k, n in enumerate(self.lengths) if n >= level and n > done]
            span = (level - done) * len(active)
            if i < span:
                return active[i % len(active)], done + i // len(active)
            i, done = i - span, level
        raise IndexError(i)

    def batch(self, idx: np.ndarray) -> Batch:
        rows = [self.parts[k].rows(np.array([r])) for k, r in map(self.locate, idx)]
        return row_batch(*(np.concatenate(a) for a in zip(*rows)))

    def fingerprint(self) -> str:
        return _key([p.fingerprint() for p in self.parts])


@dataclass
class PreparedDataset:
    """One prepared directory, split by document and packed as `data.load_dataset` packs it."""

    train: ShardRows
    valid: ShardRows
    summary: DataSummary
    source: PreparedData
    train_docs: np.ndarray  # the training documents in packing order (a mixture draws from them)

    def train_batches(self, batch_size: int, *, seed: int = 0, part: tuple[int, int] = (0, 1)) -> BatchIterator:
        return BatchIterator(self.train, batch_size, seed=seed, part=part)

    def valid_batches(self, batch_size: int) -> BatchIterator:
        return BatchIterator(self.valid, batch_size, shuffle=False, repeat=False)


def check_tokenizer(data: PreparedData, tokenizer) -> None:
    if data.manifest["tokenizer"].get("sha256") != tokenizer_digest(tokenizer):
        raise DataError(f"{data.path}: prepared with another tokenizer than this run's "
                        f"({Path(tokenizer.path).parent}); prepare it again with the run's "
                        "`tokenizer`")


def open_prepared(data: PreparedData, tokenizer, *, seq_len: int, domains: Sequence[str] | None = None,
                  val_fraction: float = 0.05, seed: int = 0, skip_invalid: bool = False,
                  as_domain: str | None = None) -> PreparedDataset:
    """`data` split and packed for a model with `domains` (as `data.load_dataset` does with the same
    arguments); a record whose domain the model lacks is an error naming its first line, or with
    `skip_invalid` skipped and counted."""
    check_tokenizer(data, tokenizer)
    m = data.manifest
    summary = DataSummary(**m["summary"])
    labels = data.label_ids()
    domain_of_label = np.full(len(data.labels) + 1, -1, np.int32)  # the last entry: no label
    dropped = []
    if as_domain is not None:
        domain_of_label[:] = list(domains).index(as_domain)
    elif domains is not None:
        for k, name in enumerate(data.labels):
            if name in domains:
                domain_of_label[k] = list(domains).index(name)
            elif not skip_invalid:
                raise DataError(f"{m['first_line'][name]}: unknown domain {name!r} (this model's domains: "
                                f"{', '.join(domains)})")
            else:
                dropped.append(k)
                n = summary.domains.pop(name)
                summary.records -= n
                summary.skipped["unknown domain"] = summary.skipped.get("unknown domain", 0) + n
                if len(summary.examples) < 5:
                    summary.examples.append(f"{m['first_line'][name]}: unknown domain {name!r} (and {n - 1} more)")
    lengths = data.lengths()
    kept = np.flatnonzero(~np.isin(labels, dropped)) if dropped else np.arange(len(data))
    if not len(kept):
        raise DataError(f"{data.path}: no valid records" + (f" ({summary})" if summary.skipped else ""))
    summary.tokens = int(lengths[kept].sum())
    summary.long_documents = int((lengths[kept] > seq_len + 1).sum())
    train_i, valid_i = split_order(len(kept), val_fraction, seed)
    small = np.uint32 if len(data) < 1 << 32 else np.int64
    key = _key(data.id, seq_len, val_fraction, seed, domain_of_label.tolist())
    parts = []
    for name, order in (("train", train_i), ("valid", valid_i)):
        docs = kept[order].astype(small)
        parts.append(ShardRows(data, docs, lengths[docs], labels, domain_of_label, seq_len, tokenizer.pad_id,
                               f"{key}-{name}"))
    return PreparedDataset(parts[0], parts[1], summary, data, parts[0].docs)


# ---- mixtures ----------------------------------------------------------------------------------------------
def read_mixture(path: Path) -> list[tuple[str, Path, float]]:
    """(name, data path, weight) of each component of a mixture file `{"name": {"path": ..., "weight": w}}`;
    relative paths are relative to the file's directory."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a mixture file ({e})") from None
    if not isinstance(spec, dict) or not spec:
        raise DataError(f'{path}: a mixture is a JSON object {{"name": {{"path": DIR, "weight": W}}, ...}}')
    out = []
    for name, c in spec.items():
        if not isinstance(c, dict) or set(c) != {"path", "weight"}:
            raise DataError(f'{path}: "{name}" must be {{"path": DIR, "weight": W}}, got {json.dumps(c)[:80]}')
        if not isinstance(c["path"], str) or not c["path"]:
            raise DataError(f'{path}: "{name}".path must be a non-empty string')
        w = c["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not math.isfinite(w):
            raise DataError(f'{path}: "{name}".weight must be a number > 0, got {w!r}')
        out.append((name, Path(path).parent / c["path"], float(w)))
    return out


class MixtureIterator:
    """Endless rows drawn from several datasets by weight: each next document comes from the component whose
    tokens drawn so far, divided by its weight, are fewest (so token shares follow the weights), the next of
    that component's training documents (reshuffled at each of its epochs). Rows are packed as `data.pack`
    packs; `state_dict()` holds the exact stream position."""

    seen_key = "mixture_tokens"

    def __init__(self, parts: list[PreparedDataset], names: list[str], weights: list[float], batch_size: int, *,
                 seed: int = 0, part: tuple[int, int] = (0, 1)):
        if batch_size % part[1]:
            raise ValueError(f"batch_size {batch_size} does not split over {part[1]} ranks")
        self.parts, self.names, self.batch_size, self.seed, self.part = parts, names, batch_size, seed, part
        self.weights = np.asarray(weights, np.float64) / sum(weights)
        self.W, self.pad_id = parts[0].train.W, parts[0].train.pad_id
        self.key = _key([p.train.key for p in parts], list(self.weights))
        self.epochs, self.pos, self.taken = [0] * len(parts), [0] * len(parts), np.zeros(len(parts), np.int64)
        self.current: list | None = None  # [component, document, length, tokens of it already placed]
        self.lengths = [np.diff(p.train.cum) for p in parts]  # each component's training documents' lengths
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def _order(self, c: int) -> np.ndarray:
        """Component `c`'s training documents in its current epoch's order (positions into `train_docs`)."""
        e = self.epochs[c]
        if c not in self._orders or self._orders[c][0] != e:
            n = len(self.parts[c].train_docs)
            self._orders[c] = (e, np.arange(n) if e == 0 else
                               np.random.default_rng([self.seed, 7, c, e]).permutation(n))
        return self._orders[c][1]

    def _row(self) -> list[tuple]:
        pieces, at, seg = [], 0, 0
        while at < self.W:
            if self.current is None:
                c = int(np.argmin(self.taken / self.weights))
                if self.pos[c] == len(self.parts[c].train_docs):
                    self.epochs[c], self.pos[c] = self.epochs[c] + 1, 0
                j = int(self._order(c)[self.pos[c]])
                self.pos[c] += 1
                p = self.parts[c]
                self.current = [c, int(p.train_docs[j]), int(self.lengths[c][j]), 0]
            c, doc, length, off = self.current
            k = min(self.W - at, length - off)
            pieces.append((c, doc, off, off + k, at, seg))
            at, self.taken[c] = at + k, self.taken[c] + k
            self.current[3] = off + k
            if off + k == length:
                self.current, seg = None, seg + 1
        return pieces

    def __iter__(self) -> "MixtureIterator":
        return self

    def __next__(self) -> Batch:
        rank, ranks = self.part
        share = self.batch_size // ranks
        rows = [self._row() for _ in range(self.batch_size)][rank * share:(rank + 1) * share]
        tok = np.full((share, self.W), self.pad_id, np.int32)
        train = np.zeros((share, self.W), bool)
        seg, dom = np.full((share, self.W), -1, np.int32), np.full((share, self.W), -1, np.int32)
        for i, pieces in enumerate(rows):
            for c, doc, s, e, at, sg in pieces:
                t = self.parts[c].train
                tok[i, at:at + e - s], train[i, at:at + e - s] = t.data.read(doc, s, e)
                seg[i, at:at + e - s], dom[i, at:at + e - s] = sg, t.domain_of_label[t.labels[doc]]
        return row_batch(tok, train, seg, dom)

    def tokens_seen(self) -> dict[str, int]:
        return {n: int(t) for n, t in zip(self.names, self.taken)}

    def state_dict(self) -> dict:
        return {"mixture": self.names, "epochs": list(self.epochs), "pos": list(self.pos),
                "taken": self.taken.tolist(), "current": self.current, "seed": self.seed,
                "batch_size": self.batch_size, "data": self.key}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data") != self.key or state.get("batch_size") != self.batch_size:
            raise DataError("the training data differs from the mixture this run was saved with (its components, "
                            "weights, batch size or split); resume with the same mixture and options")
        self.epochs, self.pos = list(state["epochs"]), list(state["pos"])
        self.taken = np.asarray(state["taken"], np.int64)
        self.current, self.seed = state["current"], int(state["seed"])


@dataclass
class MixtureDataset:
    parts: list[PreparedDataset]
    names: list[str]
    weights: list[float]
    paths: list[Path]
    valid: InterleavedRows

    @property
    def summary(self) -> DataSummary:
        return self.parts[0].summary

    def train_batches(self, batch_size: int, *, seed: int = 0, part: tuple[int, int] = (0, 1)) -> MixtureIterator:
        return MixtureIterator(self.parts, self.names, self.weights, batch_size, seed=seed, part=part)

    def valid_batches(self, batch_size: int) -> BatchIterator:
        return BatchIterator(self.valid, batch_size, shuffle=False, repeat=False)

    def describe(self, path, seq_len: int) -> str:
        total = sum(self.weights)
        parts = "; ".join(f"{n} {w / total:.0%} of tokens: {p} ({d.summary})"
                          for n, w, p, d in zip(self.names, self.weights, self.paths, self.parts))
        return (f"data: mixture {path}: {parts}; {len(self.valid)} validation sequences of {seq_len} tokens")


# ---- what the trainers read ---------------------------------------------------------------------------------
def _source(data: str | Path | Sequence, tokenizer, skip_invalid: bool, progress: bool) -> PreparedData:
    if isinstance(data, (str, Path)) and is_prepared(Path(data)):
        return PreparedData(data)
    if isinstance(data, (str, Path)) and (Path(data) / WORK).is_dir():
        read_manifest(Path(data))  # raises: an unfinished prepare
    from .prepare import prepared_cache
    return PreparedData(prepared_cache(data, tokenizer, skip_invalid=skip_invalid, progress=progress))


def open_dataset(data: str | Path, tokenizer, *, seq_len: int, domains: Sequence[str] | None = None,
                 val_fraction: float = 0.05, seed: int = 0, skip_invalid: bool = False,
                 as_domain: str | None = None, progress: bool = True) -> PreparedDataset | MixtureDataset:
    """The training data `data` names: a prepared directory, a mixture file (`.json`), or JSONL (a file, a
    folder, a glob), which is prepared once into the cache (`prepare.prepared_cache`) and read from there."""
    options = dict(seq_len=seq_len, domains=domains, val_fraction=val_fraction, seed=seed,
                   skip_invalid=skip_invalid, as_domain=as_domain)
    if Path(data).suffix == ".json" and Path(data).is_file():
        spec = read_mixture(Path(data))
        parts = [open_prepared(_source(p, tokenizer, skip_invalid, progress), tokenizer, **options)
                 for _, p, _ in spec]
        for (name, p, _), d in zip(spec, parts):
            if not len(d.train_docs):
                raise DataError(f"{data}: component {name!r} ({p}) has no training documents")
        return MixtureDataset(parts, [n for n, _, _ in spec], [w for *_, w in spec], [p for _, p, _ in spec],
                              InterleavedRows([d.valid for d in parts]))
    return open_prepared(_source(data, tokenizer, skip_invalid, progress), tokenizer, **options)
