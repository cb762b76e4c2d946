"""CPU implementations of the model's attention operations (dh_mlx.model.attention).

`attend` computes softmax attention with MLX ops compiled once for every shape, so the mask, exp and
normalisation run as fused vectorised kernels; mx.fast's CPU fallback runs a scalar exp. On a multi-core CPU
large attentions split into two halves on the two streams. Decode-sized absorbed attention runs as one
native node (in float32 for bfloat16 / float16 inputs).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from ...model import attention as model_attention
from ...model.attention import causal_mask
from . import native
from .streams import Streams

# Below this many score entries per half, one stream is as fast (the thread hand-off costs more).
SPLIT_MIN_SCORES = 1 << 16
# Splitting query rows that share their keys makes each half read all the keys: below this many rows per
# half (decode: heads x 1 token) the key read dominates.
SPLIT_MIN_SHARED_KEY_ROWS = 64


def make(streams: Streams | None) -> dict:
    """The implementations, splitting over `streams` (None: never)."""

    def side() -> mx.Stream | None:
        return None if streams is None else streams.side()

    def sdpa(q, k, v, scale: float, mask, axis: int = 1) -> mx.array:
        """`attend`, the query `axis` (1: heads, with per-head keys and values; 2: query rows, keys shared)
        split in two halves on the two streams when that pays. Same result as one call."""
        stream = side()
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

    def causal_sdpa(q, k, v, scale: float) -> mx.array:
        """Causal self-attention (queries = keys): the queries in four blocks, block i attending only keys
        [0, (i+1)L/4), so most of the masked upper triangle is never computed; blocks {0, 3} and {1, 2} run on
        the two streams (equal work). Same result as one call."""
        stream = side()
        B, H, L, _ = q.shape
        if stream is None or L < 8 or B * H * L * L < 4 * SPLIT_MIN_SCORES:
            return attend(q, k, v, scale, "causal")
        ends = [L * (i + 1) // 4 for i in range(4)]
        starts = [0] + ends[:3]

        def block(i: int) -> mx.array:  # "causal" aligns the block's queries to the last of its keys
            e = ends[i]
            return attend(q[:, :, starts[i]:e], k[:, :, :e], v[:, :, :e], scale, "causal")

        with mx.stream(stream):
            second = [block(1), block(2)]
        first = [block(0), block(3)]
        return mx.concatenate([first[0], second[0], second[1], first[1]], axis=2)

    def attention(q, k, v, scale: float, mask) -> mx.array:
        if mx.default_device() != mx.cpu:
            return model_attention.attention.reference(q, k, v, scale, mask)
        if mask == "causal" and q.shape[-2] == k.shape[-2]:
            return causal_sdpa(q, k, mx.contiguous(v), scale)  # one copy of the values, not one per block
        return sdpa(q, k, v, scale, mask)

    def absorbed_attention(q_nope, q_pe, latent, k_pe, kv_b, scale: float, mask) -> mx.array:
        if mx.default_device() != mx.cpu:
            return model_attention.absorbed_attention.reference(q_nope, q_pe, latent, k_pe, kv_b, scale, mask)
        B, H, L, n = q_nope.shape
        S, r = latent.shape[2], latent.shape[3]
        v_dim = kv_b.shape[0] // H - n
        # bfloat16 / float16: the node computes in float32 (MLX's half-precision CPU matmuls are scalar)
        args = tuple(a.astype(mx.float32) for a in (q_nope, q_pe, latent, k_pe, kv_b))
        # One batch row at a time (the node loops over B): what bounds it is each row's H * L query rows.
        if native.usable_small(args[0][0], *args[1:]):
            if mask is None or isinstance(mask, str):
                mode, kernel_mask = (1 if L > 1 and mask == "causal" else 0), mx.array(True)
            elif mask.dtype == mx.bool_ and mask.shape[1:] == (1, L, S) and mask.shape[0] in (1, B):
                mode, kernel_mask = 2, mask
            else:
                mode = -1
            if mode >= 0:  # decode: one native node
                return native_absorbed(*args, kernel_mask, mode, scale, v_dim).astype(q_nope.dtype)
        w = kv_b.reshape(H, n + v_dim, r)
        q_lat = q_nope @ w[:, :n]  # (B, H, L, n) @ (H, n, r) -> (B, H, L, r)
        # Every head attends to the same latent "head": heads folded into rows make one (H*L, r) x (r, S)
        # product that reads the cache once instead of once per head.
        q_lat = q_lat.reshape(B, 1, H * L, r)
        # The RoPE part of the score, computed keys-down-the-rows (the layout `attend` scores in) and handed
        # over as a transposed view.
        pe_t = k_pe @ (q_pe.reshape(B, 1, H * L, -1) * scale).swapaxes(-1, -2)  # (B, 1, S, H*L)
        if isinstance(mask, str):
            if L > 1:
                pe_t = mx.where(mx.tile(causal_mask(L, S).T, (1, H)), pe_t, -mx.inf)
        elif mask is not None:  # (B|1, H|1, L, S) bool or additive -> (B, 1, S, H*L)
            mask = mx.broadcast_to(mask, (mask.shape[0], H, L, S)).reshape(mask.shape[0], 1, H * L, S)
            mask = mask.swapaxes(-1, -2)
            pe_t = mx.where(mask, pe_t, -mx.inf) if mask.dtype == mx.bool_ else pe_t + mask
        out = sdpa(q_lat, latent, latent, scale, pe_t.swapaxes(-1, -2), axis=2)  # split the H*L query rows
        out = out.reshape(B, H, L, r)
        return out @ w[:, n:].swapaxes(-1, -2)  # (B, H, L, r) @ (H, r, v) -> (B, H, L, v)

    return {"attention": attention, "absorbed_attention": absorbed_attention, "_sdpa": sdpa,
            "_causal_sdpa": causal_sdpa}


@mx.custom_function
def native_absorbed(q_nope, q_pe, latent, k_pe, w, mask, mode: int, scale: float, v_dim: int):
    """Absorbed MLA attention as one native node; keys visible: mode 0 all, 1 causal, 2 where the bool mask
    (B|1, 1, L, S) is True. Differentiated through `absorbed_reference`."""
    return native.load().mla_absorbed(q_nope, q_pe, latent, k_pe, w, mask, mode, scale, v_dim)


def absorbed_reference(q_nope, q_pe, latent, k_pe, w, mask, mode, scale, v_dim):
    B, H, L, n = q_nope.shape
    S, r = latent.shape[2], latent.shape[3]
    w = w.reshape(H, n + v_dim, r)
    s = scale * ((q_nope @ w[:, :n]) @ latent.swapaxes(-1, -2) + q_pe @ k_pe.swapaxes(-1, -2))  # (B, H, L, S)
    if mode == 1:
        s = mx.where(causal_mask(L, S), s, -mx.inf)
    elif mode == 2:
        s = mx.where(mask, s, -mx.inf)
    return (mx.softmax(s, axis=-1) @ latent) @ w[:, n:].swapaxes(-1, -2)


@native_absorbed.vjp
def _native_absorbed_vjp(primals, cotangent, output):
    q_nope, q_pe, latent, k_pe, w, mask, mode, scale, v_dim = primals
    _, grads = mx.vjp(lambda *a: absorbed_reference(*a, mask, mode, scale, v_dim), [q_nope, q_pe, latent, k_pe, w],
                      [cotangent])
    return (*grads, mx.zeros_like(mask), None, None, None)


def attend(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """softmax(scale * q k^T + mask) v for q (..., L, d), k (..., S, d), v (..., S, dv), with the model's mask
    conventions (`attention`), as compiled MLX ops."""
    if k.shape[-2] < 2:  # MLX's shapeless compile mis-handles a single key (crashes)
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
    faster than over a contiguous last axis; the product takes p^T as a transposed operand (no copy). The
    normalisation comes after the product (L x dv divisions instead of L x S).
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
