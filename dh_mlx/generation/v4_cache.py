"""DeepSeek-V4's per-layer cache: the sliding window of keys (the last sliding_window - 1, which are also the
values), and for each compressor ("compressor", and CSA's "indexer") the entries emitted so far, the source
tokens of the unfinished window, and (CSA) the half-projection of the last window the next entry starts from.

Evicted keys and closed windows do not come back by themselves, so the cache also keeps what taking back the
last `UNDO` positions needs (what a rejected MTP draft needs): the keys that left the window last, and the
source rows of the windows closed last with the overlap state before each. `trim` takes back at most that (or
everything); `trimmable` is False, so a prompt cache that must drop more starts again."""

from __future__ import annotations

import mlx.core as mx

UNDO = 2  # positions a trim may take back (one rejected draft, and the step queued after it)


class CompressorState:
    def __init__(self):
        self.buffer: tuple[mx.array, mx.array] | None = None  # (kv, gate) of < rate source tokens
        self.entries: mx.array | None = None  # (B, T, dim)
        self.count = 0  # entries emitted: the next window starts at count * rate
        self.overlap: tuple[mx.array, mx.array] | None = None  # CSA: the last window's first halves
        self.rate = 0  # source tokens per entry (set by the compressor)
        # The last windows emitted, oldest first: (their kv rows, gate rows, the overlap before them)
        self.closed: list[tuple[mx.array, mx.array, tuple | None]] = []

    def close(self, n: int, rows: tuple[mx.array, mx.array], windows: tuple[mx.array, mx.array] | None) -> None:
        """n windows are being emitted: `rows` (kv, gate) (B, >= n * rate, width) as projected, `windows` (CSA)
        the same (B, n, rate, 2c) with the position bias, whose first halves become the overlap state."""
        m = self.rate
        for i in range(max(0, n - UNDO), n):
            c = None if windows is None else windows[0].shape[-1] // 2
            before = None if windows is None else self.overlap if i == 0 else tuple(
                a[:, i - 1:i, :, :c] for a in windows)
            self.closed.append((rows[0][:, i * m:(i + 1) * m], rows[1][:, i * m:(i + 1) * m], before))
        del self.closed[:-UNDO]

    def _buffered(self) -> int:
        return 0 if self.buffer is None else self.buffer[0].shape[1]

    def can_trim(self, n: int) -> bool:
        b = self._buffered()
        return n <= b or -(-(n - b) // self.rate) <= len(self.closed)

    def trim(self, n: int) -> None:
        """Forget the last n source tokens: from the unfinished window, then reopening closed ones."""
        b = self._buffered()
        if n <= b:
            self.buffer = (self.buffer[0][:, : b - n], self.buffer[1][:, : b - n])
            return
        k = -(-(n - b) // self.rate)  # windows to reopen
        for _ in range(k):
            kv, gate, self.overlap = self.closed.pop()
        self.count -= k
        self.entries = self.entries[:, : self.count]
        keep = k * self.rate - (n - b)  # of the earliest reopened window's rows
        self.buffer = (kv[:, :keep], gate[:, :keep])

    def arrays(self) -> list[mx.array]:
        rows = [a for kv, gate, o in self.closed for a in (kv, gate, *(o or ()))]
        return [a for a in (self.entries, *(self.buffer or ()), *(self.overlap or ())) if a is not None] + rows


class V4LayerCache:
    trimmable = False  # (at most UNDO positions)
    fixed_capacity = False  # no compiled fixed-capacity steps (generation.steps): its arrays change shape

    def __init__(self):
        self.window: mx.array | None = None  # (B, 1, <= W - 1, head_dim)
        self.evicted: list[mx.array] = []  # (B, 1, ., head_dim) each: the last UNDO keys that left the window
        self.size = 0  # W - 1
        self.offset = 0
        self.states: dict[str, CompressorState] = {}

    def state(self, name: str) -> CompressorState:
        return self.states.setdefault(name, CompressorState())

    def window_keys(self, kv: mx.array, window: int) -> tuple[mx.array, int]:
        """Add the new keys (B, 1, L, d); returns (the cached window and them, the first one's position)."""
        start = self.offset - (0 if self.window is None else self.window.shape[2])
        keys = kv if self.window is None else mx.concatenate([self.window, kv], axis=2)
        self.size = window - 1
        cut = keys.shape[2] - min(self.size, keys.shape[2])
        if cut:
            self.evicted.append(keys[:, :, max(0, cut - UNDO):cut])
            while sum(e.shape[2] for e in self.evicted[1:]) >= UNDO:
                self.evicted.pop(0)
        self.window = keys[:, :, cut:]
        self.offset += kv.shape[2]
        return keys, start

    @property
    def has_past(self) -> bool:
        return self.offset > 0

    def can_trim(self, n: int) -> bool:
        held = sum(k.shape[2] for k in self.evicted + [self.window] if k is not None)  # the last keys
        return (n <= UNDO and held - n >= min(self.offset - n, self.size)
                and all(s.can_trim(n) for s in self.states.values()))

    def trim(self, n: int) -> int:
        """Forget the last n positions (a rejected draft's): at most UNDO of them, or all; returns how many."""
        n = max(0, min(n, self.offset))
        if n == 0:
            return 0
        if n == self.offset:  # forgetting everything is always possible
            self.__init__()
            return n
        if not self.can_trim(n):
            raise ValueError(f"a DeepSeek-V4 cache takes back at most its last {UNDO} positions (its window and "
                             f"compressed entries are not reversible further), not {n}; start a new one")
        keys = mx.concatenate(self.evicted + [self.window], axis=2)  # positions offset - len .. offset - 1
        keys = keys[:, :, : keys.shape[2] - n]
        cut = keys.shape[2] - min(self.size, keys.shape[2])
        self.window, self.evicted = keys[:, :, cut:], [keys[:, :, :cut]] if cut else []
        for s in self.states.values():
            s.trim(n)
        self.offset -= n
        return n

    def arrays(self) -> list[mx.array]:
        out = ([] if self.window is None else [self.window]) + self.evicted
        for s in self.states.values():
            out += s.arrays()
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())
