"""Latent KV cache for MLA: per layer only the normalised latent (r) and the RoPE key (p) per token, and with
DeepSeek Sparse Attention the indexer's key (index_head_dim) beside them."""

from __future__ import annotations

import mlx.core as mx

from ..config import ModelConfig


class LatentCache:
    """Grows in chunks of `step` positions; `offset` is the number of valid positions."""

    step = 256

    def __init__(self):
        self.latent: mx.array | None = None  # (B, 1, capacity, r)
        self.k_pe: mx.array | None = None  # (B, 1, capacity, p)
        self.index_k: mx.array | None = None  # (B, 1, capacity, index_head_dim): a layer with an indexer only
        self.offset = 0

    def update_and_fetch(self, latent: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, 1, L, r) and (B, 1, L, p); return everything cached so far, (B, 1, S, .)."""
        L = latent.shape[2]
        prev = self.offset
        if self.latent is None:  # empty buffers of the right batch, width and dtype; reserve allocates
            self.latent = mx.zeros((*latent.shape[:2], 0, latent.shape[3]), latent.dtype)
            self.k_pe = mx.zeros((*k_pe.shape[:2], 0, k_pe.shape[3]), k_pe.dtype)
        self.reserve(L)
        self.offset += L
        self.latent[:, :, prev:self.offset] = latent
        self.k_pe[:, :, prev:self.offset] = k_pe
        return self.latent[:, :, : self.offset], self.k_pe[:, :, : self.offset]

    def update_index(self, key: mx.array) -> mx.array:
        """The indexer's keys (B, 1, L, d) of the positions `update_and_fetch` just added; returns all (B, 1, S, d)."""
        L = key.shape[2]
        if self.index_k is None:
            self.index_k = mx.zeros((*key.shape[:2], self.latent.shape[2], key.shape[3]), key.dtype)
        self.index_k[:, :, self.offset - L:self.offset] = key
        return self.index_k[:, :, : self.offset]

    def arrays(self) -> list[mx.array]:
        """The buffers (what a prefill chunk evaluates)."""
        return [a for a in (self.latent, self.k_pe, self.index_k) if a is not None]

    @property
    def has_past(self) -> bool:
        """Whether earlier positions are cached (MLA then attends through the absorbed path)."""
        return self.offset > 0

    def reserve(self, n: int) -> None:
        """Make room for `n` more positions, growing by whole chunks (appends and fixed-capacity steps)."""
        if self.latent is not None and self.offset + n > self.latent.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            pad = lambda buf: mx.concatenate(  # noqa: E731
                [buf[:, :, : self.offset], mx.zeros((*buf.shape[:2], grow, buf.shape[3]), buf.dtype)], axis=2)
            self.latent, self.k_pe = pad(self.latent), pad(self.k_pe)
            if self.index_k is not None:
                self.index_k = pad(self.index_k)

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (speculative decoding rollback); returns how many were dropped."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.latent[:, :, : self.offset], self.k_pe[:, :, : self.offset]

    @property
    def nbytes(self) -> int:
        """Bytes of the valid positions (what a token costs, without the chunk slack)."""
        if self.latent is None:
            return 0
        return sum(a[:, :, : self.offset].nbytes for a in (self.latent, self.k_pe, self.index_k) if a is not None)


class StepCache:
    """A compiled step's view of a LatentCache, with shapes that do not change per token: the L new positions
    are written at `write` (an int32 array) into the full capacity-C buffers, and attention reads all C
    positions under a mask of the valid ones (`valid_mask`).

    With `pad` (B,), the view of a left-padded batch (`batch.BatchCache`): row b's positions start at pad[b],
    so its RoPE positions (`offset`, per row) are write - pad and the mask also hides the padding."""

    has_past = True

    def __init__(self, latent: mx.array, k_pe: mx.array, write: mx.array, index_k: mx.array | None = None,
                 pad: mx.array | None = None):
        self.latent, self.k_pe, self.write, self.pad = latent, k_pe, write, pad  # (B, 1, C, r), (B, 1, C, p)
        self.offset = write if pad is None else write - pad  # () or (B,): what RoPE rotates by
        self.index_k = index_k  # (B, 1, C, index_head_dim) or None

    def update_and_fetch(self, latent: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array]:
        start = self.write.reshape(1)
        self.latent = mx.slice_update(self.latent, latent, start, axes=(2,))
        self.k_pe = mx.slice_update(self.k_pe, k_pe, start, axes=(2,))
        return self.latent, self.k_pe

    def update_index(self, key: mx.array) -> mx.array:
        self.index_k = mx.slice_update(self.index_k, key, self.write.reshape(1), axes=(2,))
        return self.index_k

    def valid_mask(self, L: int = 1) -> mx.array:
        """(1|B, 1, L, C) bool: new token i sees the positions up to and including its own, write + i (and,
        in a padded batch, none of its row's padding)."""
        positions = mx.arange(self.latent.shape[2])
        seen = (positions[None] <= self.write + mx.arange(L)[:, None])[None, None]  # (1, 1, L, C)
        if self.pad is None:
            return seen
        return seen & (positions >= self.pad[:, None])[:, None, None]  # (B, 1, L, C)


def layer_cache(config: ModelConfig) -> LatentCache:
    """One layer's empty cache (DeepSeek-V4: its own, v4_cache.py)."""
    if config.model_type == "deepseek_v4":
        from .v4_cache import V4LayerCache
        return V4LayerCache()
    return LatentCache()


def make_cache(config: ModelConfig) -> list[LatentCache]:
    """One cache per layer of the main stack."""
    return [layer_cache(config) for _ in range(config.num_hidden_layers)]
