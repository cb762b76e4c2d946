"""Several sequences decoding together over one latent cache: left-padded rows that write each new token at one
shared position, so a batched step is the single-sequence compiled step with a per-row mask and per-row RoPE
positions (mlx-lm's BatchKVCache does the same for per-head caches).

Legend: B rows, C cache capacity, r kv_lora_rank, p qk_rope_head_dim. Row b holds its T_b positions at
[pad[b], write) of buffers (B, 1, C, r) and (B, 1, C, p) per layer. A sequence joins after its prompt was
prefilled alone (`add`: its cache copied in, right-aligned at `write`), and leaves when done (`remove`).
"""

from __future__ import annotations

import mlx.core as mx

from ..model import Model
from .cache import LatentCache, StepCache


class BatchCache:
    """The latent caches (one per layer) of the rows decoding together."""

    step = 256  # capacity grows in chunks, so the compiled step traces once per chunk

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.latents: list[mx.array] = []  # per layer (B, 1, C, r)
        self.k_pes: list[mx.array] = []  # per layer (B, 1, C, p)
        self.index_ks: list[mx.array | None] = []  # per layer (B, 1, C, d) for a sparse-attention indexer, or None
        self.write = 0  # where every row's next token goes
        self.pad: list[int] = []  # row b's first position

    def _map(self, fn) -> None:
        """Apply `fn` to every buffer (latents, RoPE keys, indexer keys)."""
        self.latents, self.k_pes = [fn(a) for a in self.latents], [fn(a) for a in self.k_pes]
        self.index_ks = [None if a is None else fn(a) for a in self.index_ks]

    def __len__(self) -> int:
        return len(self.pad)

    @property
    def capacity(self) -> int:
        return self.latents[0].shape[2] if self.latents else 0

    def lengths(self) -> list[int]:
        return [self.write - p for p in self.pad]

    def _grow(self, left: int, right: int) -> None:
        """Add `left` positions before every row (the padding grows) and room for `right` after `write`. The
        capacity becomes the fewest whole chunks that hold them (each capacity is a trace of the compiled step):
        the slack after `write` absorbs a left shift instead of adding a chunk per joining row."""
        capacity = -(-(self.write + left + right) // self.step) * self.step
        extra = capacity - (self.capacity + left)
        if extra < 0:  # the positions cut are empty slack past `write`
            self._map(lambda a: mx.pad(a[:, :, : self.capacity + extra], [(0, 0), (0, 0), (left, 0), (0, 0)]))
        else:
            self._map(lambda a: mx.pad(a, [(0, 0), (0, 0), (left, extra), (0, 0)]))
        self.write += left
        self.pad = [p + left for p in self.pad]

    def reserve(self, n: int) -> None:
        """Room for `n` more positions after `write`."""
        short = self.write + n - self.capacity
        if self.latents and (short > 0 or self.capacity % self.step):
            self._grow(0, max(short, 0))

    def add(self, cache: list[LatentCache]) -> int:
        """Append a prefilled single sequence (its per-layer caches, B = 1) as a new row; returns its index."""
        T = cache[0].offset
        if not self.latents:  # the first row (copies: a view would stop the step from writing in place)
            self.latents = [mx.array(c.latent[:, :, :T]) for c in cache]
            self.k_pes = [mx.array(c.k_pe[:, :, :T]) for c in cache]
            self.index_ks = [None if c.index_k is None else mx.array(c.index_k[:, :, :T]) for c in cache]
            self.write, self.pad = T, [0]
            self.reserve(1)
            return 0
        if T > self.write:  # a longer row than any so far: every other row's padding grows
            self._grow(T - self.write, 0)
        self.reserve(1)
        before, after = self.write - T, self.capacity - self.write
        row = lambda a: mx.pad(a[:, :, :T], [(0, 0), (0, 0), (before, after), (0, 0)])  # noqa: E731
        self.latents = [mx.concatenate([b, row(c.latent)]) for b, c in zip(self.latents, cache)]
        self.k_pes = [mx.concatenate([b, row(c.k_pe)]) for b, c in zip(self.k_pes, cache)]
        self.index_ks = [None if b is None else mx.concatenate([b, row(c.index_k)])
                         for b, c in zip(self.index_ks, cache)]
        self.pad.append(before)
        return len(self.pad) - 1

    def remove(self, rows: list[int]) -> None:
        """Drop rows; the padding every remaining row shares is dropped too."""
        keep = [b for b in range(len(self.pad)) if b not in set(rows)]
        if not keep:
            self.__init__(self.n_layers)
            return
        if len(keep) < len(self.pad):
            index = mx.array(keep)
            self._map(lambda a: mx.take(a, index, axis=0))
            self.pad = [self.pad[b] for b in keep]
        shared = min(self.pad)
        if shared >= self.step:  # keep the capacity a whole number of chunks: fewer traces
            cut = shared // self.step * self.step
            self._map(lambda a: mx.array(a[:, :, cut:]))
            self.write -= cut
            self.pad = [p - cut for p in self.pad]

    def row(self, b: int) -> list[LatentCache]:
        """Row b's positions as single-sequence caches (copies: the prefix cache keeps them)."""
        out = []
        for lat, kpe, idx in zip(self.latents, self.k_pes, self.index_ks):
            c = LatentCache()
            c.latent = mx.array(lat[b:b + 1, :, self.pad[b]:self.write])
            c.k_pe = mx.array(kpe[b:b + 1, :, self.pad[b]:self.write])
            c.index_k = None if idx is None else mx.array(idx[b:b + 1, :, self.pad[b]:self.write])
            c.offset = self.write - self.pad[b]
            out.append(c)
        return out


class BatchStep:
    """The model's compiled step over a BatchCache: tokens (B, L) -> (logits (B, L, V), hidden (B, L, D)),
    advancing every row by L. Traced once per batch size and capacity chunk."""

    def __init__(self, model: Model):
        def step(tokens, write, pad, latents, k_pes, index_ks, domain):
            views = [StepCache(lat, kpe, write, idx, pad=pad) for lat, kpe, idx in zip(latents, k_pes, index_ks)]
            out = model.forward(tokens, views, domain, mask=views[0].valid_mask(tokens.shape[1]))
            return out.logits, out.hidden, [v.latent for v in views], [v.k_pe for v in views], \
                [v.index_k for v in views]

        self._compiled = mx.compile(step)

    def __call__(self, tokens: mx.array, cache: BatchCache, domain: mx.array | None = None):
        L = tokens.shape[1]
        cache.reserve(L)
        buffers = cache.latents, cache.k_pes, cache.index_ks
        cache.latents = cache.k_pes = cache.index_ks = []  # handed over: the step's updates then write in place
        logits, hidden, *buffers = self._compiled(tokens, mx.array(cache.write, mx.int32),
                                                  mx.array(cache.pad, mx.int32), *buffers, domain)
        cache.latents, cache.k_pes, cache.index_ks = buffers
        cache.write += L
        return logits, hidden
