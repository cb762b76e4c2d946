"""Writing a model directory's weights as safetensors shards (HF naming and index), one shard at a time.

Shards are written under temporary dotfile names (which readers skip) and renamed once their count is known,
then the index and config.json last, so an interrupted write never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx

from ..config import ModelConfig, save_config
from ..files import remove, write_atomic, write_failure
from .layout import WEIGHT_FILES
from ..outputs import remove_owned
from ..progress import note

DEFAULT_SHARD_BYTES = 5 * 10**9




def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class ShardWriter:
    """Collects tensors (`add`) into shards of at most `max_shard_bytes`, writing each as it fills; `finish`
    names them `model-0000i-of-0000N.safetensors` (or `model.safetensors` when one) and writes the index and
    the config. Earlier weight files of these names in `path` are removed first, and its config.json (written
    last again), so an interrupted write never looks like a model; other files stay."""

    def __init__(self, path: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.path, self.max = Path(path), max_shard_bytes
        self.path.mkdir(parents=True, exist_ok=True)
        removed = remove_owned(self.path, WEIGHT_FILES + r"|config\.json")
        if [n for n in removed if not n.startswith(".tmp-")]:
            note(f"{self.path}: replacing {', '.join(removed)}")
        self.pending: dict[str, mx.array] = {}
        self.size = self.total = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict[str, mx.array]) -> None:
        for k in sorted(tensors, key=natural_key):
            if self.pending and self.size + tensors[k].nbytes > self.max:
                self._flush()
            self.pending[k] = tensors[k]
            self.size += tensors[k].nbytes
            self.total += tensors[k].nbytes

    def _flush(self) -> None:
        f = self.path / f".tmp-shard-{len(self.written) + 1:05d}.safetensors"
        remove(f)
        try:
            mx.save_safetensors(str(f), self.pending, metadata={"format": "pt"})
        except Exception as e:
            remove(f)
            raise write_failure(f, e) from None
        self.written.append((f, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self, config: ModelConfig) -> None:
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _), name in zip(self.written, names):
            os.replace(tmp, self.path / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: name for (_, keys), name in zip(self.written, names) for k in keys}}
            write_atomic(self.path / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        save_config(config, self.path)
