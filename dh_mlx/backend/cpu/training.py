"""CPU implementations of training's cross-entropy and squared gradient norm (dh_mlx.train.loss, .optim).

The rows of a cross-entropy split over the two streams. With the native kernels each row is one pass forward
(max, then the sum of exponentials while the row is in cache) keeping only its log-sum-exp, and one pass
backward; without them MLX ops keep the forward's probabilities, so the backward pass does not exponentiate
again. The squared norm runs through the BLAS, which is faster and sums more accurately than MLX's
single-threaded reduction.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from ... import ops
from . import native
from .streams import Streams


def _ce_rows(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """(N, V), (N,) -> (cross-entropy (N,), softmax (N, V))."""
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = mx.exp(logits - m)
    total = e.sum(axis=-1, keepdims=True)
    return (m + mx.log(total) - mx.take_along_axis(logits, targets[:, None], axis=-1))[:, 0], e / total


def make_cross_entropy(side: Callable[[], mx.Stream | None]):
    """(..., V) logits, (...) targets -> (per-token cross-entropy (...), what the backward pass reuses for the
    rows on the default stream, for the rows on `side()`). Same value and gradient as MLX's cross-entropy."""

    @mx.custom_function
    def cross_entropy(logits: mx.array, targets: mx.array):
        V = logits.shape[-1]
        x, t = logits.reshape(-1, V), targets.reshape(-1).astype(mx.int32)
        stream = side()
        h = x.shape[0] if stream is None or x.shape[0] < 2 else x.shape[0] // 2
        ext = native.usable(x)
        rows = _ce_rows if ext is None else ext.ce_forward
        if h < x.shape[0]:
            with mx.stream(stream):
                ce2, kept2 = rows(x[h:], t[h:])
        else:
            ce2, kept2 = mx.zeros((0,), x.dtype), mx.zeros((0,) if ext else (0, V), x.dtype)
        ce1, kept1 = rows(x[:h], t[:h])
        return mx.concatenate([ce1, ce2]).reshape(targets.shape), kept1, kept2

    @cross_entropy.vjp
    def _cross_entropy_vjp(primals, cotangents, outputs):
        logits, targets = primals
        V = logits.shape[-1]
        x, t, g = logits.reshape(-1, V), targets.reshape(-1).astype(mx.int32), cotangents[0].reshape(-1)
        _, kept1, kept2 = outputs
        h = kept1.shape[0]

        def grad(kept, rows):  # d CE / d logits = (softmax - onehot(target)) * cotangent
            if kept.ndim == 1:  # the native forward kept log-sum-exps
                return native.load().ce_backward(x[rows], t[rows], kept, g[rows])
            return (kept - (mx.arange(V) == t[rows, None])) * g[rows, None]

        if kept2.shape[0]:
            with mx.stream(side()):
                g2 = grad(kept2, slice(h, None))
            out = mx.concatenate([grad(kept1, slice(0, h)), g2])
        else:
            out = grad(kept1, slice(None))
        return out.reshape(logits.shape), mx.zeros_like(targets)

    return cross_entropy


def squared_norm(g: mx.array) -> mx.array:
    """sum(g ** 2) in float32 as the trace of the 4 x 4 product of g's four quarters with themselves: a GEMM
    the BLAS streams through memory, instead of MLX's single-threaded square and sum."""
    if mx.default_device() != mx.cpu:
        return ops.reference("squared_norm")(g)
    v = g.reshape(-1).astype(mx.float32)
    if v.size % 4:
        return (v[None] @ v[:, None]).reshape(())
    a = v.reshape(4, -1)
    return mx.trace(a @ a.T)


def make(streams: Streams | None) -> dict:
    parts = make_cross_entropy(lambda: None if streams is None else streams.side())

    def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
        if mx.default_device() != mx.cpu:
            return ops.reference("cross_entropy")(logits, targets)
        return parts(logits, targets)[0]

    return {"cross_entropy": cross_entropy, "squared_norm": squared_norm, "_cross_entropy_parts": parts}
