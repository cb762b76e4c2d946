"""Latent KV cache for MLA: per layer only the normalised latent (r) and the RoPE key (p) per token."""

from __future__ import annotations

import mlx.core as mx

from .config import ModelConfig


class LatentCache:
    """Grows in chunks of `step` positions; `offset` is the number of valid positions."""

    step = 256

    def __init__(self):
        self.latent: mx.array | None = None  # (B, 1, capacity, r)
        self.k_pe: mx.array | None = None  # (B, 1, capacity, p)
        self.offset = 0

    def update_and_fetch(self, latent: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, 1, L, r) and (B, 1, L, p); return everything cached so far, (B, 1, S, .)."""
        L = latent.shape[2]
        prev = self.offset
        if self.latent is None or prev + L > self.latent.shape[2]:
            grow = ((L + self.step - 1) // self.step) * self.step
            def extend(buf, new):
                fresh = mx.zeros((*new.shape[:2], grow, new.shape[3]), new.dtype)
                return fresh if buf is None else mx.concatenate([buf[:, :, :prev], fresh], axis=2)
            self.latent, self.k_pe = extend(self.latent, latent), extend(self.k_pe, k_pe)
        self.offset += L
        self.latent[:, :, prev:self.offset] = latent
        self.k_pe[:, :, prev:self.offset] = k_pe
        return self.latent[:, :, : self.offset], self.k_pe[:, :, : self.offset]

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (speculative decoding rollback); returns how many were dropped."""
        n = min(self.offset, n)
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
        return sum(a[:, :, : self.offset].nbytes for a in (self.latent, self.k_pe))


def make_cache(config: ModelConfig) -> list[LatentCache]:
    """One cache per layer of the main stack."""
    return [LatentCache() for _ in range(config.num_hidden_layers)]
