"""Latent KV cache for MLA: per layer only the normalised latent (r) and the RoPE key (p) per token."""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    """Grows in chunks of `step` positions; `offset` is the number of valid positions."""

    step = 256

    def __init__(self):
        self.latent: torch.Tensor | None = None  # (B, 1, capacity, r)
        self.k_pe: torch.Tensor | None = None  # (B, 1, capacity, p)
        self.offset = 0

    def update_and_fetch(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, 1, L, r) and (B, 1, L, p); return everything cached so far, (B, 1, S, .)."""
        L = latent.shape[2]
        prev = self.offset
        if self.latent is None or prev + L > self.latent.shape[2]:
            capacity = prev + ((L + self.step - 1) // self.step) * self.step

            def grow(buf, new):
                fresh = new.new_zeros(new.shape[0], new.shape[1], capacity, new.shape[3])
                if buf is not None:
                    fresh[:, :, :prev] = buf[:, :, :prev]
                return fresh

            self.latent, self.k_pe = grow(self.latent, latent), grow(self.k_pe, k_pe)
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
    def nbytes(self) -> int:
        """Bytes of the valid positions (what a token costs, without the chunk slack)."""
        if self.latent is None:
            return 0
        return sum(a[:, :, : self.offset].nbytes for a in (self.latent, self.k_pe))


def make_cache(config: ModelConfig) -> list[LatentCache]:
    """One cache per layer of the main stack."""
    return [LatentCache() for _ in range(config.num_hidden_layers)]
