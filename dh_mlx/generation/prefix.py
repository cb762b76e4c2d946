"""Prefix reuse: an LRU of finished sequences' latent caches, keyed by their tokens and bounded in bytes. A new
prompt that shares a prefix with a kept sequence (a system prompt, a conversation's earlier turns) starts from
a copy of those positions and prefills only the rest: a position's latent depends only on the tokens up to it.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx

from .cache import LatentCache


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], list[LatentCache]] = OrderedDict()  # oldest use first
        self.bytes = 0
        self.hit_tokens = 0  # positions reused so far (what `cached_tokens` adds up)

    @staticmethod
    def _size(caches: list[LatentCache]) -> int:
        return sum(c.nbytes for c in caches)

    def insert(self, tokens: list[int], caches: list[LatentCache]) -> None:
        """Keep `caches` (single-sequence, holding exactly `tokens`); the least recently used go past the bound."""
        key = tuple(tokens)
        size = self._size(caches)
        if not key or size > self.max_bytes:
            return
        if key in self.entries:
            self.bytes -= self._size(self.entries.pop(key))
        for other in [k for k in self.entries if k[: len(key)] == key]:  # held whole inside the new one
            self.bytes -= self._size(self.entries.pop(other))
        self.entries[key] = caches
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= self._size(old)

    def lookup(self, prompt: list[int]) -> tuple[int, list[LatentCache] | None]:
        """(n, caches holding the prompt's first n positions, copied) for the longest kept prefix, n at most
        len(prompt) - 1 (the last position is run for its logits); (0, None) without one."""
        best, best_key = 0, None
        for key in self.entries:
            n = 0
            for a, b in zip(key, prompt):
                if a != b:
                    break
                n += 1
            if n > best:
                best, best_key = n, key
        best = min(best, len(prompt) - 1)
        if best_key is None or best <= 0:
            return 0, None
        self.entries.move_to_end(best_key)
        out = []
        for c in self.entries[best_key]:
            copy = LatentCache()
            copy.latent = mx.array(c.latent[:, :, :best])
            copy.k_pe = mx.array(c.k_pe[:, :, :best])
            copy.offset = best
            out.append(copy)
        self.hit_tokens += best
        return best, out
