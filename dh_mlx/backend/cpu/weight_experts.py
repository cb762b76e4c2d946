"""The routed experts' projections for the native "native" and decode paths (backend.cpu.experts), by how a
projection stores its weights (`kind`): float32 through the BLAS segment kernel, and bfloat16 / float16 or MLX
affine 4/8-bit through the weight kernels (`native/quantized.cpp`), which read the weights as stored. A LoRA
adapter over any of them adds its two float32 segment products. Each is differentiable: the input gradient (QLoRA
trains through the packed base), and the weight gradient for float and half weights; a packed base is frozen.
"""

from __future__ import annotations

import functools
from typing import Callable

import mlx.core as mx

from ...model.moe import Projection, dropout
from . import native
from .layers import swiglu
from .quantized import FLOATS, packed_format, result_dtype


def kind(p: Projection) -> str | None:
    """How the native kernels read a stacked projection: "float32", "half", "packed" (MLX affine 4/8-bit),
    "lora" (an adapter over one of those), or None (they do not)."""
    a, q = p.adapter, p.quantization
    if a is not None:
        return "lora" if kind(p.base()) and a.lora_a.dtype == a.lora_b.dtype == mx.float32 else None
    if q is None:
        return None if p.weight.dtype not in FLOATS else "float32" if p.weight.dtype == mx.float32 else "half"
    return "packed" if packed_format(q.mode, q.bits, q.group_size) and p.biases is not None else None


def _weights(p: Projection) -> tuple[tuple[mx.array, mx.array, mx.array], int, int]:
    """((weight, scales, biases), bits, group size); float weights pass themselves as scales and biases, bits 0."""
    q = p.quantization
    if q is not None:
        return (p.weight, p.scales, p.biases), q.bits, q.group_size
    return (p.weight, p.weight, p.weight), 0, 0


@mx.custom_function
def segment_linear(x: mx.array, w: mx.array, offsets: mx.array) -> mx.array:
    """x (R, in) rows sorted by expert, w (E, out, in), offsets (E + 1,) int32 -> (R, out): rows offsets[e] to
    offsets[e + 1] times w[e].T, one BLAS call per expert (`native.load()` must have succeeded)."""
    return native.load().segment_rows(x, w, offsets, True)


@segment_linear.vjp
def _segment_linear_vjp(primals, dy, y):
    x, w, offsets = primals
    ext = native.load()
    return ext.segment_rows(dy, w, offsets, False), ext.segment_outer(dy, x, offsets), mx.zeros_like(offsets)


@functools.cache
def weight_segment(bits: int, group_size: int) -> Callable:
    """(x, w, scales, biases, offsets) -> x's rows of expert e times W_e^T, W stored as `bits` (0: float)."""

    @mx.custom_function
    def segment(x, w, scales, biases, offsets):
        return native.load().qsegment(x, w, scales, biases, offsets, bits, group_size, True,
                                      result_dtype(x.dtype, scales.dtype))

    @segment.vjp
    def segment_vjp(primals, dy, y):
        x, w, scales, biases, offsets = primals
        ext = native.load()
        dx = ext.qsegment(dy, w, scales, biases, offsets, bits, group_size, False, x.dtype)
        if bits:  # a packed base is frozen
            dw = mx.zeros_like(w)
        else:  # summed in float32, as the float path's
            dw = ext.segment_outer(dy.astype(mx.float32), x.astype(mx.float32), offsets).astype(w.dtype)
        return dx, dw, mx.zeros_like(scales), mx.zeros_like(biases), mx.zeros_like(offsets)

    return segment


def segment_project(p: Projection, x: mx.array, offsets: mx.array) -> mx.array:
    """x (P, in) sorted by expert -> (P, out) through projection `p` (any `kind`)."""
    a = p.adapter
    if a is not None:
        y = segment_project(p.base(), x, offsets)
        z = segment_linear(segment_linear(dropout(x, a.dropout, a.key).astype(mx.float32), a.lora_a, offsets),
                           a.lora_b, offsets)
        return y + (a.scale * z).astype(y.dtype)
    if kind(p) == "float32" and x.dtype == mx.float32:
        return segment_linear(x, p.weight, offsets)
    (w, scales, biases), bits, group = _weights(p)
    return weight_segment(bits, group)(x, w, scales, biases, offsets)


@functools.cache
def _rows(specs: tuple) -> Callable:
    """The decode node for projections stored as `specs` ((bits, group size) each, 0 bits: float)."""
    bits, groups = [b for b, _ in specs], [g for _, g in specs]

    def reference(x, idx, weights, *arrays):
        """What the node computes, through MLX's gather_qmm / gather_mm (its gradient)."""
        D, k = x.shape[-1], idx.shape[-1]
        i = idx.reshape(-1, k)

        def project(h, j):
            w, s, b = arrays[3 * j: 3 * j + 3]
            if bits[j]:
                return mx.gather_qmm(h, w, s, b, rhs_indices=i, transpose=True, group_size=groups[j], bits=bits[j])
            return mx.gather_mm(h, w.swapaxes(-1, -2), rhs_indices=i)

        xs = x.reshape(-1, 1, 1, D)
        y = project(swiglu(project(xs, 0), project(xs, 1)), 2)  # (N, k, 1, D)
        return (y.reshape(*idx.shape, D) * weights[..., None].astype(y.dtype)).sum(axis=-2)

    @mx.custom_function
    def rows(x, idx, weights, *arrays):
        out = x.dtype
        for j in range(3):
            out = result_dtype(out, arrays[3 * j + 1].dtype)
        return native.load().qexperts(x, idx, weights, list(arrays[0:3]), list(arrays[3:6]), list(arrays[6:9]), bits,
                                      groups, out)

    @rows.vjp
    def rows_vjp(primals, cotangent, output):
        x, idx, weights, *arrays = primals
        floats = [j for j in range(3) if not bits[j]]  # a packed base is frozen: no gradient taken through it

        def f(x, w, *float_weights):
            a = list(arrays)
            for j, fw in zip(floats, float_weights):
                a[3 * j: 3 * j + 3] = [fw] * 3
            return reference(x, idx, w, *a)

        _, (dx, dw, *dfloat) = mx.vjp(f, [x, weights, *(arrays[3 * j] for j in floats)], [cotangent])
        da = [mx.zeros_like(a) for a in arrays]
        for j, g in zip(floats, dfloat):
            da[3 * j] = g
        return (dx, mx.zeros_like(idx), dw, *da)

    return rows


def packed_expert_rows(x: mx.array, idx: mx.array, weights: mx.array,
                       projections: tuple[Projection, ...]) -> mx.array:
    """x (..., D), idx and weights (..., k) -> (..., D): each token through its k experts (gate, up, down
    `projections` of kind float32, half or packed), weighted and summed, as one native node."""
    specs, arrays = [], []
    for p in projections:
        a, bits, group = _weights(p)
        specs.append((bits, group))
        arrays += a
    return _rows(tuple(specs))(x, idx, weights, *arrays)
