"""Prepared token shards, format version 1 (written by `dh-mlx data prepare`, described in docs/data.md): the
files, the manifest, one shard's writer, and a reader of documents through `np.memmap`. numpy only: the PyTorch
twin's trainer reads them on a machine without MLX.

A prepared directory holds `manifest.json` (written last: without it the directory is not a dataset) and, per
shard `i`, four little-endian files: `shard-i.tokens` (the documents' token ids back to back, uint16 when the
vocabulary fits, else uint32), `shard-i.mask` (one bit per token, 1 where the token is trained as a target,
`np.packbits(bitorder="little")`), `shard-i.offsets` (uint64, documents + 1 token offsets from 0) and
`shard-i.labels` (int16 per document: its domain label's index in the shard's label table, -1 for none).
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .records import DataError

FORMAT, VERSION = "dh-mlx-prepared", 1
MANIFEST = "manifest.json"
WORK = ".tmp-prepare"  # an unfinished prepare's chunk records (outputs.py: `.tmp-*` is an interrupted write)
KINDS = ("tokens", "mask", "offsets", "labels")
OPEN_SHARDS = 64  # memory maps kept open at once (each holds a file descriptor)


def shard_path(directory: Path, index: int, kind: str) -> Path:
    return Path(directory) / f"shard-{index:05d}.{kind}"


def token_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def file_sha256(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_files(tokenizer) -> list[Path]:
    """The files that decide how a tokenizer tokenizes training records (ids, special tokens, chat template)."""
    path = Path(tokenizer.path)
    if path.name == "tokenizer.model":
        return [path]
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "generation_config.json")
    return [path.parent / n for n in names if (path.parent / n).is_file()]


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    for p in tokenizer_files(tokenizer):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def write_json_atomic(path: Path, value) -> None:
    """`path` holds the whole JSON or its old content, never a part (temp file, fsync, rename)."""
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """One shard, written as `.tmp-` files and renamed into place by `close()`; memory stays at about
    `flush_tokens` x 6 bytes plus 10 bytes a document."""

    def __init__(self, directory: Path, index: int, dtype: str, flush_tokens: int = 1 << 20):
        self.directory, self.index, self.dtype = Path(directory), index, np.dtype(dtype)
        self.flush_tokens = flush_tokens
        self.tmp = {k: self.directory / f".tmp-shard-{index:05d}-{os.getpid()}.{k}" for k in KINDS}
        self.files = {k: open(self.tmp[k], "wb") for k in ("tokens", "mask")}
        self.hashes = {k: hashlib.sha256() for k in KINDS}
        self._ids: list[np.ndarray] = []
        self._train: list[np.ndarray] = [np.zeros(0, bool)]  # starts with the bits not yet a whole byte
        self._buffered = 0
        self.ends, self.labels, self.table = array("Q", [0]), array("h"), {}
        self.limit = int(np.iinfo(self.dtype).max)

    def _write(self, kind: str, data: bytes) -> None:
        self.files[kind].write(data)
        self.hashes[kind].update(data)

    def add(self, ids: np.ndarray, train: np.ndarray, label: str | None) -> None:
        if len(ids) and int(ids.max()) > self.limit:
            raise DataError(f"token id {int(ids.max())} does not fit the shard's {self.dtype.name} ids")
        self._ids.append(ids)
        self._train.append(train)
        self._buffered += len(ids)
        self.ends.append(self.ends[-1] + len(ids))
        self.labels.append(-1 if label is None else self.table.setdefault(label, len(self.table)))
        if self._buffered >= self.flush_tokens:
            self._flush()

    def _flush(self, final: bool = False) -> None:
        if self._ids:
            self._write("tokens", np.concatenate(self._ids).astype(self.dtype).tobytes())
        bits = np.concatenate(self._train)
        whole = len(bits) if final else len(bits) // 8 * 8
        self._write("mask", np.packbits(bits[:whole], bitorder="little").tobytes())
        self._ids, self._train, self._buffered = [], [bits[whole:]], 0

    def close(self) -> dict:
        """Finish the shard: its files renamed into place; returns its manifest entry."""
        self._flush(final=True)
        for k, data in (("offsets", np.frombuffer(self.ends, np.uint64).astype("<u8").tobytes()),
                        ("labels", np.frombuffer(self.labels, np.int16).astype("<i2").tobytes())):
            self.files[k] = open(self.tmp[k], "wb")
            self._write(k, data)
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for k in KINDS:
            os.replace(self.tmp[k], shard_path(self.directory, self.index, k))
        return {"documents": len(self.labels), "tokens": int(self.ends[-1]), "labels": list(self.table),
                "sha256": {k: self.hashes[k].hexdigest() for k in KINDS}}

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        for p in self.tmp.values():
            p.unlink(missing_ok=True)


def read_manifest(path: Path) -> dict:
    """A prepared directory's manifest, checked; a `DataError` naming the directory otherwise."""
    path = Path(path)
    m = path / MANIFEST
    if not m.is_file():
        if (path / WORK).is_dir():
            raise DataError(f"{path}: an unfinished `dh-mlx data prepare` (no {MANIFEST} yet); run the same command "
                            "again to finish it")
        raise DataError(f"{path}: not a prepared data directory (no {MANIFEST})")
    try:
        manifest = json.loads(m.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{m}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{m}: not a dh-mlx prepared data manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise DataError(f"{m}: prepared data format version {manifest.get('version')!r}; this dh-mlx reads version "
                        f"{VERSION} (prepare the data again)")
    for key, kind in (("shards", list), ("labels", list), ("token_dtype", str), ("tokenizer", dict), ("id", str),
                      ("summary", dict)):
        if not isinstance(manifest.get(key), kind):
            raise DataError(f"{m}: field {key!r} must be a {kind.__name__}")
    if manifest["token_dtype"] not in ("<u2", "<u4"):
        raise DataError(f"{m}: field 'token_dtype' must be '<u2' or '<u4', got {manifest['token_dtype']!r}")
    return manifest


def is_prepared(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


class PreparedData:
    """A prepared directory's documents, read through memory maps (at most `OPEN_SHARDS` shards open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.dtype = np.dtype(self.manifest["token_dtype"])
        self.shards = self.manifest["shards"]
        self.labels: list[str] = self.manifest["labels"]
        try:
            counts = [(int(s["documents"]), int(s["tokens"])) for s in self.shards]
            bad = [i for i, s in enumerate(self.shards) if not set(s["labels"]) <= set(self.labels)]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.path / MANIFEST}: a shard entry lacks or mistypes {e}") from None
        if bad:
            raise DataError(f"{self.path / MANIFEST}: shard {bad[0]} names labels missing from 'labels'")
        self.doc_base = np.cumsum([0] + [d for d, _ in counts])
        for i, (docs, tokens) in enumerate(counts):  # a cheap check that every file is there, whole
            for kind, size in (("tokens", tokens * self.dtype.itemsize), ("mask", (tokens + 7) // 8),
                               ("offsets", (docs + 1) * 8), ("labels", docs * 2)):
                p = shard_path(self.path, i, kind)
                if not p.is_file() or p.stat().st_size != size:
                    raise DataError(f"{p}: missing or of another size than {MANIFEST} records ({size} bytes); "
                                    "prepare the data again")
        self._open: OrderedDict[int, tuple] = OrderedDict()

    def __len__(self) -> int:
        return int(self.doc_base[-1])

    @property
    def id(self) -> str:
        return self.manifest["id"]

    def lengths(self) -> np.ndarray:
        """[documents] int64: every document's token count (reads the offsets files)."""
        parts = [np.diff(np.fromfile(shard_path(self.path, i, "offsets"), "<u8").astype(np.int64))
                 for i in range(len(self.shards))]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def label_ids(self) -> np.ndarray:
        """[documents] int16: every document's index into `labels`, -1 for none."""
        index = {name: k for k, name in enumerate(self.labels)}
        parts = []
        for i, s in enumerate(self.shards):
            local = np.fromfile(shard_path(self.path, i, "labels"), "<i2")
            table = np.array([index[n] for n in s["labels"]] + [-1], np.int16)  # [-1] for the -1 entries
            parts.append(table[local])
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def _maps(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        maps = tuple(np.memmap(shard_path(self.path, shard, k), dtype=d, mode="r")
                     for k, d in (("tokens", self.dtype), ("mask", np.uint8), ("offsets", "<u8")))
        self._open[shard] = maps
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return maps

    def read(self, doc: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens `start..stop-1` of document `doc` (int32) and their trained flags (bool)."""
        shard = int(np.searchsorted(self.doc_base, doc, side="right")) - 1
        tokens, mask, offsets = self._maps(shard)
        base = int(offsets[doc - int(self.doc_base[shard])])
        a, b = base + start, base + stop
        lo = a // 8
        bits = np.unpackbits(mask[lo:(b + 7) // 8], bitorder="little")[a - lo * 8:b - lo * 8]
        return tokens[a:b].astype(np.int32), bits.astype(bool)
