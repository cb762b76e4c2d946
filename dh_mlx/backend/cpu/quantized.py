"""CPU implementations over quantized and half-precision weights: the quantized linear and embedding
(dh_mlx.quant) and linears with bfloat16 / float16 weights (dh_mlx.model.layers), through the native kernels
(`native/quantized.cpp`: MLX's affine 4- and 8-bit format read as it is stored, float32 arithmetic). MLX's CPU
quantized_matmul and its bfloat16 / float16 matmuls run a scalar loop on x86. The weights stay as stored: no
float copy is kept; many-row products convert a tile of rows at a time for the BLAS. Other bit widths, modes or
group sizes, and other devices, take the reference.
"""

from __future__ import annotations

import functools
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ...quant import quantized_embedding as _embedding_reference
from ...quant import quantized_linear as _reference
from . import native

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
HALF = (mx.bfloat16, mx.float16)
FLOATS = (mx.float32, mx.bfloat16, mx.float16)


def result_dtype(a: mx.Dtype, b: mx.Dtype) -> mx.Dtype:
    """MLX's promotion of two float dtypes (bfloat16 with float16 gives float32)."""
    return a if a == b else mx.float32


def packed_format(mode: str, bits: int | None, group_size: int | None) -> bool:
    """MLX quantization options whose packed weights the native kernels read."""
    return mode == "affine" and bits in BITS and group_size in GROUP_SIZES


def packed_ok(module: nn.Module) -> bool:
    """An MLX affine-quantized module (linear or embedding) the native kernels read."""
    return (packed_format(getattr(module, "mode", "affine"), getattr(module, "bits", None),
                          getattr(module, "group_size", None)) and module.get("biases") is not None)


def kernels(*arrays: mx.array):
    """The native extension when on the CPU with float activations `arrays`, else None."""
    if mx.default_device() != mx.cpu or any(a.dtype not in FLOATS for a in arrays):
        return None
    return native.load()


@functools.cache
def packed_matmul(bits: int, group_size: int) -> Callable:
    """(x, w, scales, biases) -> x @ dequantize(w).T; the input gradient is the transposed product (the packed
    base is frozen: zero gradients for it)."""

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return native.load().qmatmul(x, w, scales, biases, bits, group_size, True, result_dtype(x.dtype, scales.dtype))

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        dx = native.load().qmatmul(cotangent, w, scales, biases, bits, group_size, False, x.dtype)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


@mx.custom_function
def half_matmul(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T for bfloat16 / float16 `w` (out, in), summed in float32; gradients as `x @ w.T`'s."""
    return native.load().qmatmul(x, w, w, w, 0, 0, True, result_dtype(x.dtype, w.dtype))


@half_matmul.vjp
def _half_matmul_vjp(primals, cotangent, output):
    x, w = primals
    dx = native.load().qmatmul(cotangent, w, w, w, 0, 0, False, x.dtype)
    g, xf = cotangent.astype(mx.float32), x.astype(mx.float32)
    dw = g.reshape(-1, g.shape[-1]).T @ xf.reshape(-1, xf.shape[-1])  # (out, in), summed in float32
    return dx, dw.astype(w.dtype)


def quantized_linear(layer: nn.Module, x: mx.array) -> mx.array:
    ext = kernels(x) if packed_ok(layer) else None
    if ext is None:
        return _reference.reference(layer, x)
    y = packed_matmul(layer.bits, layer.group_size)(x, layer["weight"], layer["scales"], layer["biases"])
    return y + layer["bias"] if "bias" in layer else y


@functools.cache
def _packed_rows(bits: int, group_size: int) -> Callable:
    @mx.custom_function
    def rows(ids, w, scales, biases):
        return native.load().qembed(ids, w, scales, biases, bits, group_size, scales.dtype)

    @rows.vjp
    def rows_vjp(primals, cotangent, output):  # integer ids and a frozen table: nothing flows back
        return tuple(mx.zeros_like(p) for p in primals)

    return rows


def quantized_embedding(layer: nn.Module, ids: mx.array) -> mx.array:
    if not packed_ok(layer) or kernels() is None:
        return _embedding_reference.reference(layer, ids)
    return _packed_rows(layer.bits, layer.group_size)(ids, layer["weight"], layer["scales"], layer["biases"])


def half_linear(x: mx.array, weight: mx.array) -> mx.array | None:
    """x @ weight.T through the native kernels for a bfloat16 / float16 weight on the CPU, else None."""
    if weight.dtype not in HALF or weight.ndim != 2 or kernels(x) is None:
        return None
    return half_matmul(x, weight)


IMPLEMENTATIONS = {"quantized_linear": quantized_linear, "quantized_embedding": quantized_embedding}
