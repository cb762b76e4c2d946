"""Multi-head Latent Attention (DeepSeek-V2/V3), naive and absorbed paths side by side.

Legend: B batch, L new tokens, S cached + new tokens, H heads, r kv_lora_rank, n qk_nope_head_dim,
p qk_rope_head_dim, v v_head_dim.

Naive: expand the latent into per-head keys/values with `kv_b_proj` (cheap when S is small: training,
prefill). Absorbed: fold `kv_b_proj` into the query and the output, so attention runs in the r-dim latent
space and only the normalised latent and the RoPE key are ever cached.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import native
from ..config import ModelConfig
from ..device import on_gpu, side_stream
from ..rope import rope_parameters
from .layers import Linear, RMSNorm, RoPE


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
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

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        H, n, p, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
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

        if absorb:
            out = self._absorbed(q_nope, q_pe, latent, k_pe, mask, offset)
        else:
            out = self._naive(q_nope, q_pe, latent, k_pe, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, H * self.v_head_dim))

    def _naive(self, q_nope, q_pe, latent, k_pe, mask):
        B, H, L, _ = q_nope.shape
        S, n = latent.shape[2], self.qk_nope_head_dim
        kv = self.kv_b_proj(latent[:, 0])  # (B, S, H*(n+v))
        kv = kv.reshape(B, S, H, n + self.v_head_dim).transpose(0, 2, 1, 3)  # (B, H, S, n+v)
        k = mx.concatenate([kv[..., :n], mx.broadcast_to(k_pe, (B, H, S, self.qk_rope_head_dim))], axis=-1)
        q = mx.concatenate([q_nope, q_pe], axis=-1)  # (B, H, L, n+p)
        if isinstance(mask, str) and L == 1:
            mask = None
        if mask == "causal" and S == L:
            return causal_sdpa(q, k, mx.contiguous(kv[..., n:]), self.scale)  # one copy, not one per block
        return sdpa(q, k, kv[..., n:], self.scale, mask)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask, offset):
        B, H, L, _ = q_nope.shape
        S, n, r = latent.shape[2], self.qk_nope_head_dim, self.kv_lora_rank
        kv_b = self.kv_b_proj.weight  # (H * (n + v), r); a LoRA adapter's property gives the adapted matrix
        if native.usable_small(q_nope, q_pe, latent, k_pe, kv_b):
            if mask is None or isinstance(mask, str):
                mode, mask = (1 if L > 1 and mask == "causal" else 0), _NO_MASK
            elif mask.dtype == mx.bool_ and mask.shape[1:] == (1, L, S) and mask.shape[0] in (1, B):
                mode = 2
            else:
                mode = -1
            if mode >= 0:  # decode: one native node instead of ~40
                return absorbed_attention(q_nope, q_pe, latent, k_pe, kv_b, mask, mode, self.scale, self.v_head_dim)
        w = kv_b.reshape(H, n + self.v_head_dim, r)
        q_lat = q_nope @ w[:, :n]  # (B, H, L, n) @ (H, n, r) -> (B, H, L, r)
        # Every head attends to the same single latent "head", so fold heads into rows: one (H*L, r) x (r, S)
        # product reads the cache once instead of once per head (3x faster at 32K on the CPU).
        q_lat = q_lat.reshape(B, 1, H * L, r)
        # The RoPE part of the score enters SDPA as an additive mask: no per-step concat of the cache. It is
        # computed keys-down-the-rows, the layout `attend` scores in, and handed over as a transposed view.
        pe_t = k_pe @ (q_pe.reshape(B, 1, H * L, -1) * self.scale).swapaxes(-1, -2)  # (B, 1, S, H*L)
        if isinstance(mask, str):
            if L > 1:
                pe_t = mx.where(mx.tile(causal_mask(L, S).T, (1, H)), pe_t, -mx.inf)
        elif mask is not None:  # (B|1, H|1, L, S) bool or additive -> (B, 1, S, H*L)
            mask = mx.broadcast_to(mask, (mask.shape[0], H, L, S)).reshape(mask.shape[0], 1, H * L, S)
            mask = mask.swapaxes(-1, -2)
            pe_t = mx.where(mask, pe_t, -mx.inf) if mask.dtype == mx.bool_ else pe_t + mask
        out = sdpa(q_lat, latent, latent, self.scale, pe_t.swapaxes(-1, -2), axis=2)  # split the H*L query rows
        out = out.reshape(B, H, L, r)
        return out @ w[:, n:].swapaxes(-1, -2)  # (B, H, L, r) @ (H, r, v) -> (B, H, L, v)


_NO_MASK = mx.array(True)


@mx.custom_function
def absorbed_attention(q_nope, q_pe, latent, k_pe, w, mask, mode: int, scale: float, v_dim: int):
    """MLA attention in the latent space (`MLA._absorbed`) as one native node (CPU, float32, a few queries).
    q_nope (B, H, L, n), q_pe (B, H, L, p) after RoPE, latent (B, 1, S, r), k_pe (B, 1, S, p), w = kv_b_proj's
    (H * (n + v), r); keys visible: mode 0 all, 1 causal, 2 where the bool mask (B|1, 1, L, S) is True.
    -> (B, H, L, v). Differentiated through `_absorbed_reference`."""
    return native.load().mla_absorbed(q_nope, q_pe, latent, k_pe, w, mask, mode, scale, v_dim)


def _absorbed_reference(q_nope, q_pe, latent, k_pe, w, mask, mode, scale, v_dim):
    B, H, L, n = q_nope.shape
    S, r = latent.shape[2], latent.shape[3]
    w = w.reshape(H, n + v_dim, r)
    s = scale * ((q_nope @ w[:, :n]) @ latent.swapaxes(-1, -2) + q_pe @ k_pe.swapaxes(-1, -2))  # (B, H, L, S)
    if mode == 1:
        s = mx.where(causal_mask(L, S), s, -mx.inf)
    elif mode == 2:
        s = mx.where(mask, s, -mx.inf)
    return (mx.softmax(s, axis=-1) @ latent) @ w[:, n:].swapaxes(-1, -2)


@absorbed_attention.vjp
def _absorbed_attention_vjp(primals, cotangent, output):
    q_nope, q_pe, latent, k_pe, w, mask, mode, scale, v_dim = primals
    _, grads = mx.vjp(lambda *a: _absorbed_reference(*a, mask, mode, scale, v_dim), [q_nope, q_pe, latent, k_pe, w],
                      [cotangent])
    return (*grads, mx.zeros_like(mask), None, None, None)


# Below this many score entries per half, one stream is as fast (thread hand-off costs ~0.1 ms).
SPLIT_MIN_SCORES = 1 << 16
# Splitting query rows that share their keys pays for the softmax (single-threaded exp per score) but makes
# each half read all the keys: below this many rows per half (decode: heads x 1 token) the key read dominates,
# and split halves decoded tiny at 32K / 128K context at 20-29 / 6-7 tokens/s against 38-43 / 11 unsplit.
SPLIT_MIN_SHARED_KEY_ROWS = 64


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask, axis: int = 1) -> mx.array:
    """Scaled dot-product attention; on a multi-core CPU the query `axis` (1: heads, with per-head keys and
    values; 2: query rows, keys shared) is split in two halves computed on two streams (see `side_stream`).
    Same result as one call."""
    stream = side_stream()
    n = q.shape[axis]
    split_kv = axis == 1 and k.shape[1] == n
    if (stream is None or n < 2 or (q.size // q.shape[-1]) * k.shape[-2] < 2 * SPLIT_MIN_SCORES
            or (not split_kv and n < 2 * SPLIT_MIN_SHARED_KEY_ROWS)):
        return attend(q, k, v, scale, mask)
    split_mask = isinstance(mask, mx.array) and mask.shape[axis] == n

    def half(i: int):
        cut = lambda x, on: x[(slice(None),) * axis + (slice(i * (n // 2), n if i else n // 2),)] if on else x  # noqa: E731
        return dict(q=cut(q, True), k=cut(k, split_kv), v=cut(v, split_kv), scale=scale, mask=cut(mask, split_mask))

    with mx.stream(stream):
        second = attend(**half(1))
    first = attend(**half(0))
    return mx.concatenate([first, second], axis=axis)


def causal_sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal self-attention (queries = keys, (B, H, L, .)); on a multi-core CPU the queries go in four blocks,
    block i attending only keys [0, (i+1)L/4), so the masked upper triangle is mostly never computed (37 % fewer
    scores, each costing a single-threaded exp), and blocks {0, 3} and {1, 2} run on the two streams (equal
    work). Same result as one call."""
    stream = side_stream()
    B, H, L, _ = q.shape
    if stream is None or L < 8 or B * H * L * L < 4 * SPLIT_MIN_SCORES:
        return attend(q, k, v, scale, "causal")
    ends = [L * (i + 1) // 4 for i in range(4)]
    starts = [0] + ends[:3]

    def block(i: int) -> mx.array:  # "causal" aligns the block's queries to the last of its keys
        e = ends[i]
        return attend(q[:, :, starts[i]:e], k[:, :, :e], v[:, :, :e], scale, "causal")

    with mx.stream(stream):
        side = [block(1), block(2)]
    main = [block(0), block(3)]
    return mx.concatenate([main[0], side[0], side[1], main[1]], axis=2)


def causal_mask(L: int, S: int) -> mx.array:
    """(L, S) bool: the L newest of S positions, query i seeing keys up to S - L + i."""
    return (mx.arange(L)[:, None] + (S - L)) >= mx.arange(S)[None]


def attend(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """softmax(scale * q k^T + mask) v for q (..., L, d), k (..., S, d), v (..., S, dv); `mask` is None,
    "causal" (query i sees keys up to S - L + i), a bool array (True: attend) or an additive array.

    On a GPU: mx.fast's fused kernel. On the CPU: the same maths as MLX ops compiled once for every shape, so
    the mask, exp and normalisation run as fused vectorised kernels (see dh_mlx/_jit.py); mx.fast's CPU
    fallback runs a scalar exp (1b, 512-token causal attention: 26 -> 16 ms).
    """
    if on_gpu() or k.shape[-2] < 2:  # MLX's shapeless compile mis-handles a single key (crashes)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    q = q * scale
    if isinstance(mask, str):
        mask = causal_mask(q.shape[-2], k.shape[-2])
    if mask is None:
        return _attend_unmasked(q, k, v)
    return (_attend_masked if mask.dtype == mx.bool_ else _attend_biased)(q, k, v, mask)


def _softmax_values(st: mx.array, v: mx.array) -> mx.array:
    """softmax(s) v from the transposed scores st = s^T (..., S, L); returns (..., L, dv).

    Keys run down the rows, so the softmax's max and sum reduce over axis -2, where MLX's CPU reductions are
    ~4x (max) and ~2.4x (sum) faster than over a contiguous last axis; the product takes p^T as a transposed
    operand (no copy). The normalisation comes after the product (L x dv divisions instead of L x S).
    """
    st = st.astype(mx.float32)
    p = mx.exp(st - mx.stop_gradient(st.max(axis=-2, keepdims=True)))  # the max only shifts: no gradient
    return ((p.swapaxes(-1, -2).astype(v.dtype) @ v) / p.sum(axis=-2)[..., None]).astype(v.dtype)


@partial(mx.compile, shapeless=True)
def _attend_unmasked(q, k, v):
    return _softmax_values(k @ q.swapaxes(-1, -2), v)


@partial(mx.compile, shapeless=True)
def _attend_masked(q, k, v, mask):
    return _softmax_values(mx.where(mask.swapaxes(-1, -2), k @ q.swapaxes(-1, -2), -mx.inf), v)


@partial(mx.compile, shapeless=True)
def _attend_biased(q, k, v, bias):
    return _softmax_values(k @ q.swapaxes(-1, -2) + bias.swapaxes(-1, -2), v)
