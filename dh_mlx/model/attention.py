"""Multi-head Latent Attention (DeepSeek-V2/V3), naive and absorbed paths side by side.

Legend: B batch, L new tokens, S cached + new tokens, H heads, r kv_lora_rank, n qk_nope_head_dim,
p qk_rope_head_dim, v v_head_dim.

Naive: expand the latent into per-head keys/values with `kv_b_proj` (cheap when S is small: training,
prefill). Absorbed: fold `kv_b_proj` into the query and the output, so attention runs in the r-dim latent
space and only the normalised latent and the RoPE key are ever cached. `attention` and `absorbed_attention`
are replaceable operations (dh_mlx.ops). With DeepSeek Sparse Attention (V3.2, GLM-5) an indexer first picks the
positions each query attends to (model/indexer.py).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from ..ops import replaceable
from ..rope import rope_parameters
from .indexer import Indexer, gather_selected, selected_mask
from .layers import Linear, RMSNorm, RoPE


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.q_lora_rank = c.q_lora_rank
        self.kv_lora_rank = c.kv_lora_rank
        self.qk_nope_head_dim = c.qk_nope_head_dim
        self.qk_rope_head_dim = c.qk_rope_head_dim
        self.v_head_dim = c.v_head_dim
        H, dq = c.num_attention_heads, c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, H * dq, bias=False)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=1e-6)  # HF uses the default eps here
            self.q_b_proj = Linear(c.q_lora_rank, H * dq, bias=False)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                            bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.rope = RoPE(c)
        self.scale = dq**-0.5 * rope_parameters(c)[2]
        # None: absorbed exactly when earlier positions are cached (decode, later prefill chunks), so
        # per-head K/V exist for one chunk at most; True/False force a path.
        self.absorb: bool | None = None
        # DeepSeek Sparse Attention: this layer's own indexer, or (GLM-5 "shared" layers) the selection of the
        # last layer before it that ran one
        self.layer_idx = layer_idx
        self.shares_selection = c.sparse_attention and not c.has_indexer(layer_idx)
        if c.has_indexer(layer_idx):
            self.indexer = Indexer(c)

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", cache: Any = None,
                 shared: dict | None = None) -> mx.array:
        """`shared`: where a layer with an indexer leaves its selection for the layers that reuse it."""
        B, L, _ = x.shape
        H, n, p, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        q_latent = None
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))  # (B, L, q_lora_rank): the indexer's query input too
            q = self.q_b_proj(q_latent)
        q = q.reshape(B, L, H, n + p).transpose(0, 2, 1, 3)  # (B, H, L, n+p)
        q_nope, q_pe = q[..., :n], q[..., n:]
        ckv = self.kv_a_proj_with_mqa(x)  # (B, L, r+p)
        latent = self.kv_a_layernorm(ckv[..., :r])[:, None]  # (B, 1, L, r)
        k_pe = ckv[..., r:][:, None]  # (B, 1, L, p)

        offset = cache.offset if cache is not None else 0
        absorb = self.absorb if self.absorb is not None else cache is not None and cache.has_past
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe, offset)
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)  # (B, 1, S, r), (B, 1, S, p)

        topk = self._select(x, q_latent, mask, cache, offset, shared)
        if topk is not None:  # attend to the chosen positions only
            if absorb and L == 1:
                latent, k_pe, mask = gather_selected(topk, latent, k_pe, mask)
            else:
                mask = selected_mask(topk, latent.shape[2], mask)
        if absorb:
            out = self._absorbed(q_nope, q_pe, latent, k_pe, mask)
        else:
            out = self._naive(q_nope, q_pe, latent, k_pe, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, H * self.v_head_dim))

    def _select(self, x, q_latent, mask, cache, offset, shared) -> mx.array | None:
        """(B, L, index_topk) positions each query attends to; None: all (no indexer, or few enough positions)."""
        if "indexer" in self:
            topk = self.indexer(x, q_latent, mask, cache, offset)
            if shared is not None:
                shared["topk"] = topk
            return topk
        if not self.shares_selection:
            return None
        if shared is None or "topk" not in shared:
            raise ValueError(f"layer {self.layer_idx} reuses an earlier layer's indexer selection (indexer_types "
                             "'shared'); run it after that layer, passing the same `shared` dict")
        return shared["topk"]

    def _naive(self, q_nope, q_pe, latent, k_pe, mask):
        B, H, L, _ = q_nope.shape
        S, n = latent.shape[2], self.qk_nope_head_dim
        kv = self.kv_b_proj(latent[:, 0])  # (B, S, H*(n+v))
        kv = kv.reshape(B, S, H, n + self.v_head_dim).transpose(0, 2, 1, 3)  # (B, H, S, n+v)
        k = mx.concatenate([kv[..., :n], mx.broadcast_to(k_pe, (B, H, S, self.qk_rope_head_dim))], axis=-1)
        q = mx.concatenate([q_nope, q_pe], axis=-1)  # (B, H, L, n+p)
        if isinstance(mask, str) and L == 1:
            mask = None
        return attention(q, k, kv[..., n:], self.scale, mask)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask):
        # kv_b_proj's (H * (n + v), r) matrix; a LoRA adapter's property gives the adapted one
        return absorbed_attention(q_nope, q_pe, latent, k_pe, self.kv_b_proj.weight, self.scale, mask)


def causal_mask(L: int, S: int) -> mx.array:
    """(L, S) bool: the L newest of S positions, query i seeing keys up to S - L + i."""
    return (mx.arange(L)[:, None] + (S - L)) >= mx.arange(S)[None]


@replaceable("attention")
def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """softmax(scale * q k^T + mask) v for q (B, H, L, d), k (B, H|1, S, d), v (B, H|1, S, dv); `mask` is None,
    "causal" (query i sees keys up to S - L + i), a bool array (True: attend) or an additive array."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@replaceable("absorbed_attention")
def absorbed_attention(q_nope, q_pe, latent, k_pe, kv_b, scale: float, mask) -> mx.array:
    """MLA in the latent space: q_nope (B, H, L, n), q_pe (B, H, L, p) after RoPE, latent (B, 1, S, r),
    k_pe (B, 1, S, p), kv_b = kv_b_proj's weight (H * (n + v), r) -> (B, H, L, v).

    kv_b_proj's key half folds into the query and its value half into the output, so every head attends to
    the one cached latent "head"; the RoPE part of the score enters as an additive mask.
    """
    B, H, L, n = q_nope.shape
    S, r = latent.shape[2], latent.shape[3]
    w = kv_b.reshape(H, -1, r)  # (H, n + v, r)
    q_lat = q_nope @ w[:, :n]  # (B, H, L, n) @ (H, n, r) -> (B, H, L, r)
    pe = (q_pe * scale) @ k_pe.swapaxes(-1, -2)  # (B, H, L, S)
    if isinstance(mask, str):
        if L > 1:
            pe = mx.where(causal_mask(L, S), pe, -mx.inf)
    elif mask is not None:  # (B|1, H|1, L, S) bool or additive
        pe = mx.where(mask, pe, -mx.inf) if mask.dtype == mx.bool_ else pe + mask
    out = mx.fast.scaled_dot_product_attention(q_lat, latent, latent, scale=scale, mask=pe)  # (B, H, L, r)
    return out @ w[:, n:].swapaxes(-1, -2)  # (B, H, L, r) @ (H, r, v) -> (B, H, L, v)
