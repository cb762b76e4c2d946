"""CPU implementation of the quantized linear (dh_mlx.quant): from CPU_DEQUANTIZE_ROWS rows on, the packed
weight is dequantized into a transient float matrix and multiplied by the BLAS, since MLX's CPU
quantized_matmul is far slower than a float matmul there. The memory stays that of the packed weight."""

from __future__ import annotations

import functools
from typing import Callable

import mlx.core as mx

from ...quant import quantized_linear as _reference

CPU_DEQUANTIZE_ROWS = 32


@functools.cache
def _dequantized_matmul(group_size: int, bits: int, mode: str) -> Callable:
    """x @ W^T from packed W; the backward pass dequantizes again rather than keep the float W alive."""

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ mx.dequantize(w, scales, biases, group_size, bits, mode=mode).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        dx = cotangent @ mx.dequantize(w, scales, biases, group_size, bits, mode=mode)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)  # the packed base is frozen

    return matmul


def quantized_linear(layer, x: mx.array) -> mx.array:
    if mx.default_device() != mx.cpu or x.size // x.shape[-1] < CPU_DEQUANTIZE_ROWS:
        return _reference.reference(layer, x)
    y = _dequantized_matmul(layer.group_size, layer.bits, layer.mode)(x, layer.weight, layer.scales, layer.biases)
    return y + layer.bias if "bias" in layer else y


IMPLEMENTATIONS = {"quantized_linear": quantized_linear}
