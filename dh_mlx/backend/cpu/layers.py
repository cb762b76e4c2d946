"""CPU implementations of the model's linear, RMS norm, RoPE and SwiGLU (dh_mlx.model.layers).

Decode-sized float32 inputs (at most `native.SMALL_ROWS` rows) run as one native node each instead of
several MLX ones; larger linears keep the BLAS call but take a gradient laid out for the optimizer, and
SwiGLU runs as one fused compiled kernel both ways. A bfloat16 / float16 weight goes through the native weight
kernels (`quantized.half_linear`: half storage, float32 sums), not MLX's scalar half-precision matmul.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ...model import layers
from . import native
from .quantized import half_linear, result_dtype


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one compiled elementwise kernel, with a gradient that fuses as well."""
    return _swiglu(gate, up)


@partial(mx.compile, shapeless=True)
def _swiglu(gate, up):
    return nn.silu(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    """d/d gate = c * up * s * (1 + gate * (1 - s)), d/d up = c * silu(gate), s = sigmoid(gate).

    Inside a compiled step MLX merges equal subexpressions and does not fuse a node several kernels consume;
    spelling the sigmoid differently in the forward and each gradient keeps each one fused kernel.
    """
    gate, up = primals
    s = 1 / (1 + mx.exp(-gate))
    d_gate = cotangent * up * s * (1 + gate * (1 - s))
    d_up = cotangent * gate / (1 + mx.exp(gate * -1.0))
    return d_gate, d_up


def linear(x: mx.array, weight: mx.array) -> mx.array:
    ext = native.usable_small(x, weight)
    if ext is not None:
        return ext.linear(x, weight)
    y = half_linear(x, weight)
    return y if y is not None else row_major_linear(x, weight)


@mx.custom_function
def row_major_linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T whose weight gradient is `dy^T @ x`, which the BLAS writes in row-major order; MLX's own
    is a transposed view the optimizer's fused update would first copy."""
    return x @ weight.T


@row_major_linear.vjp
def _row_major_linear_vjp(primals, cotangent, output):
    x, weight = primals
    dx = (cotangent @ weight).astype(x.dtype)  # (..., out) @ (out, in)
    d_weight = cotangent.reshape(-1, cotangent.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (out, N) @ (N, in)
    return dx, d_weight.astype(weight.dtype)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    xf, wf = x.astype(mx.float32), weight.astype(mx.float32)  # half precision: computed in float32, rounded once
    ext = native.usable_small(xf, wf)
    if ext is None:
        return layers.rms_norm.reference(x, weight, eps)
    return ext.rms_norm(xf, wf, eps).astype(result_dtype(x.dtype, weight.dtype))


def rope(x, offset, wavelengths, dims: int, traditional: bool, scale: float) -> mx.array:
    xf = x.astype(mx.float32)
    ext = native.usable_small(xf, wavelengths)
    if ext is None or isinstance(offset, mx.array) and offset.size > 1:  # (per-row positions: the reference)
        return layers.rope.reference(x, offset, wavelengths, dims, traditional, scale)
    off = offset.astype(mx.int32) if isinstance(offset, mx.array) else mx.array(offset, mx.int32)
    return ext.rope(xf, off, wavelengths, dims, traditional, scale).astype(x.dtype)  # cos/sin in-kernel


def cpu_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return swiglu(gate, up) if mx.default_device() == mx.cpu else layers.swiglu.reference(gate, up)


def cpu_linear(x: mx.array, weight: mx.array) -> mx.array:
    return linear(x, weight) if mx.default_device() == mx.cpu else layers.linear.reference(x, weight)


IMPLEMENTATIONS = {"linear": cpu_linear, "rms_norm": rms_norm, "rope": rope, "swiglu": cpu_swiglu}
