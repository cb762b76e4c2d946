"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the lightning indexer that picks, for each query, the
`index_topk` cached positions MLA attends to, and attention restricted to them.

Legend: B batch, L new tokens, S cached + new tokens, h indexer heads, d index_head_dim, p qk_rope_head_dim,
k index_topk, r kv_lora_rank.

    score[t, s] = sum_h  w[t, h] * relu(q[t, h] . key[s]) * d^-1/2 * h^-1/2

q comes from the query latent (`wq_b`), key from the layer input (`wk`, then a LayerNorm), both rotated on their
first p dims (half-split pairs in V3.2, interleaved in GLM-5, as transformers computes them), w = weights_proj(x).
Each query keeps its k best-scoring positions among those its mask allows (all of them while S <= k). The
indexer's keys have a cache of their own beside the latent (d values per token and layer). The selection is
discrete: no gradient flows through it (transformers runs the indexer under no_grad).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from ..rope import rope_parameters
from .layers import Linear, rope

# Above this many (head, query, position) scores at once, the heads are summed one at a time (prefill of long
# prompts: h x L x S floats would not fit).
_AT_ONCE = 1 << 24


def _causal(L: int, S: int) -> mx.array:
    return (mx.arange(L)[:, None] + (S - L)) >= mx.arange(S)[None]


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.index_topk = c.index_n_heads, c.index_head_dim, c.index_topk
        self.wq_b = Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.wk = Linear(c.hidden_size, c.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(c.index_head_dim, eps=1e-6)
        self.weights_proj = Linear(c.hidden_size, c.index_n_heads, bias=False)  # float32, as transformers keeps it
        inv_freq, self._rope_scale, _ = rope_parameters(c)
        self._wavelengths = mx.array(1 / inv_freq)
        self._rope_dims, self._interleave = c.qk_rope_head_dim, c.indexer_rope_interleave

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """RoPE on the first p dims only (YaRN's cos/sin factor included); the rest passes through."""
        p = self._rope_dims
        rotated = rope(x[..., :p], offset, self._wavelengths, p, self._interleave, self._rope_scale)
        return mx.concatenate([rotated, x[..., p:]], axis=-1) if p < x.shape[-1] else rotated

    def __call__(self, x: mx.array, q_latent: mx.array, mask: Any, cache: Any, offset: int | mx.array
                 ) -> mx.array | None:
        """x (B, L, D), q_latent (B, L, q_lora_rank) -> each query's k chosen positions (B, L, k) int32, or None
        when there are at most k positions (every one is then attended to, as the mask allows)."""
        B, L, _ = x.shape
        q = self.wq_b(q_latent).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, h, L, d)
        key = self.k_norm(self.wk(x))[:, None]  # (B, 1, L, d)
        q, key = self._rope(q, offset), self._rope(key, offset)
        if cache is not None:
            key = cache.update_index(key)  # (B, 1, S, d)
        S = key.shape[2]
        if S <= self.index_topk:
            return None
        w = self.weights_proj(x.astype(self.weights_proj.weight.dtype)).astype(mx.float32)  # (B, L, h)
        scores = index_scores(q, key, w * (self.n_heads**-0.5 * self.head_dim**-0.5), mask)  # (B, L, S)
        k = self.index_topk
        return mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]).astype(mx.int32)


def index_scores(q: mx.array, key: mx.array, w: mx.array, mask: Any) -> mx.array:
    """sum_h w[..., h] relu(q_h . key) for q (B, h, L, d), key (B, 1, S, d), w (B, L, h) -> (B, L, S) float32,
    -inf where `mask` ("causal", None, or (B|1, 1, L, S) bool / additive) hides a position."""
    B, H, L, _ = q.shape
    S = key.shape[2]
    q, kt = q.astype(mx.float32), key.astype(mx.float32).swapaxes(-1, -2)  # (B, 1, d, S)
    if H * L * S <= _AT_ONCE:
        # heads folded into rows: one (h*L, d) x (d, S) product reads the keys once
        s = mx.maximum(q.reshape(B, 1, H * L, -1) @ kt, 0).reshape(B, H, L, S).transpose(0, 2, 1, 3)  # (B, L, h, S)
        scores = (w[:, :, None, :] @ s)[:, :, 0]  # (B, L, 1, h) @ (B, L, h, S) -> (B, L, S)
    else:
        scores = mx.zeros((B, L, S), mx.float32)
        for i in range(H):
            scores = scores + mx.maximum(q[:, i] @ kt[:, 0], 0) * w[:, :, i, None]
    if isinstance(mask, str):
        scores = mx.where(_causal(L, S), scores, -mx.inf)
    elif mask is not None:
        m = mask[:, 0]
        scores = mx.where(m, scores, -mx.inf) if m.dtype == mx.bool_ else scores + m
    return scores


def selected_mask(topk: mx.array, S: int, mask: Any) -> mx.array:
    """(B, 1, L, S) bool: the chosen positions (topk (B, L, k)) that `mask` also allows."""
    B, L, _ = topk.shape
    chosen = mx.put_along_axis(mx.zeros((B, L, S), mx.bool_), topk, mx.array(True), axis=-1)[:, None]
    if isinstance(mask, str):
        return chosen & _causal(L, S)
    if mask is None:
        return chosen
    return chosen & mask if mask.dtype == mx.bool_ else chosen & (mask > -mx.inf)


def gather_selected(topk: mx.array, latent: mx.array, k_pe: mx.array, mask: Any
                    ) -> tuple[mx.array, mx.array, mx.array | None]:
    """One query per row (decode): its k chosen positions of the cache, latent (B, 1, S, r) -> (B, 1, k, r),
    k_pe (B, 1, S, p) -> (B, 1, k, p), and `mask` (an array over S, e.g. the valid positions of a fixed-capacity
    cache) -> (B, 1, 1, k); attention then reads k positions, whatever S is."""
    B, _, k = topk.shape
    if B == 1:  # one index list: a take along the positions, no copy of the cache
        idx = topk.reshape(k)
        take = lambda a: mx.take(a, idx, axis=2)  # noqa: E731
        mask = mx.take(mask, idx, axis=-1) if isinstance(mask, mx.array) else None
        return take(latent), take(k_pe), mask
    idx = topk.reshape(B, 1, k, 1)

    def take_rows(a: mx.array) -> mx.array:
        return mx.take_along_axis(a, mx.broadcast_to(idx, (B, 1, k, a.shape[-1])), axis=2)

    if isinstance(mask, mx.array):
        mask = mx.take_along_axis(mx.broadcast_to(mask, (B, 1, 1, mask.shape[-1])), idx.reshape(B, 1, 1, k),
                                  axis=-1)
    else:
        mask = None  # one query, past positions only: every chosen one is visible
    return take_rows(latent), take_rows(k_pe), mask
