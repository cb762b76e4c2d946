"""DeepSeek-V4's per-layer cache: the sliding window of keys (the last sliding_window - 1, which are also the
values), and for each compressor ("compressor", and CSA's "indexer") the entries emitted so far, the source
tokens of the unfinished window, and (CSA) the half-projection of the last window the next entry starts from.

Positions cannot be dropped (evicted keys and closed windows do not come back): `trim` refuses, and a prompt
cache holding one starts again instead (`trimmable`)."""

from __future__ import annotations

import mlx.core as mx


class CompressorState:
    def __init__(self):
        self.buffer: tuple[mx.array, mx.array] | None = None  # (kv, gate) of < rate source tokens
        self.entries: mx.array | None = None  # (B, T, dim)
        self.count = 0  # entries emitted: the next window starts at count * rate
        self.overlap: tuple[mx.array, mx.array] | None = None  # CSA: the last window's first halves


class V4LayerCache:
    trimmable = False

    def __init__(self):
        self.window: mx.array | None = None  # (B, 1, <= W - 1, head_dim)
        self.offset = 0
        self.states: dict[str, CompressorState] = {}

    def state(self, name: str) -> CompressorState:
        return self.states.setdefault(name, CompressorState())

    def window_keys(self, kv: mx.array, window: int) -> tuple[mx.array, int]:
        """Add the new keys (B, 1, L, d); returns (the cached window and them, the first one's position)."""
        start = self.offset - (0 if self.window is None else self.window.shape[2])
        keys = kv if self.window is None else mx.concatenate([self.window, kv], axis=2)
        self.window = keys[:, :, keys.shape[2] - min(window - 1, keys.shape[2]):]
        self.offset += kv.shape[2]
        return keys, start

    @property
    def has_past(self) -> bool:
        return self.offset > 0

    def trim(self, n: int) -> int:
        if n > 0:
            raise ValueError("a DeepSeek-V4 cache cannot drop positions (its window and compressed entries "
                             "are not reversible); start a new one")
        return 0

    def arrays(self) -> list[mx.array]:
        out = [] if self.window is None else [self.window]
        for s in self.states.values():
            out += [a for a in (s.entries, *(s.buffer or ()), *(s.overlap or ())) if a is not None]
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())
