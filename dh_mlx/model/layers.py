"""Building blocks shared by every layer: SwiGLU MLP and rotary embedding (frequencies from dh_mlx.rope)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .. import native
from ..config import ModelConfig
from ..rope import rope_parameters


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, fused into one vectorised kernel on the CPU (see _jit.py: ~1 ns per element instead
    of ~15 for separate ops), with a gradient written to fuse as well (see `_swiglu_vjp`)."""
    return _swiglu(gate, up)


@partial(mx.compile, shapeless=True)
def _swiglu(gate, up):
    return nn.silu(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    """d/d gate = c * up * s * (1 + gate * (1 - s)), d/d up = c * silu(gate), s = sigmoid(gate).

    Inside a compiled training step, MLX merges equal subexpressions and does not fuse a node that several
    kernels consume: with MLX's own gradient, sigmoid(gate) is shared by the forward and both gradients and
    runs on its own as MLX's scalar sigmoid (4M elements, forward + backward: 104 ms). Here the forward and each
    gradient spell the sigmoid differently (sigmoid, 1/(1+exp(-x)), 1/(1+exp(x*-1))), so nothing is shared
    and each is one fused kernel (16 ms). Same values to ~1e-6.
    """
    gate, up = primals
    s = 1 / (1 + mx.exp(-gate))
    d_gate = cotangent * up * s * (1 + gate * (1 - s))
    d_up = cotangent * gate / (1 + mx.exp(gate * -1.0))
    return d_gate, d_up


def linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T, as `nn.Linear` computes it, with a gradient that leaves the weight's in row-major order:
    for a few float32 rows on the CPU one native node (`native.linear`, same BLAS call and gradient), else
    `_linear`."""
    ext = native.usable_small(x, weight)
    return ext.linear(x, weight) if ext is not None else _linear(x, weight)


@mx.custom_function
def _linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T with a gradient that leaves the weight's in row-major order.

    MLX's own gradient of `x @ weight.T` is the transpose of `x^T @ dy`, a column-major view; the optimizer's
    fused update of a row-major weight cannot read it contiguously, so training copied every such gradient
    to row-major order first (a strided copy of all linear weights per step, most of it on one stream while
    the other waited). Here the weight's gradient is `dy^T @ x`, which the BLAS computes straight into
    row-major order (it reads the transposed operand in place).
    """
    return x @ weight.T


@_linear.vjp
def _linear_vjp(primals, cotangent, output):
    x, weight = primals
    dx = (cotangent @ weight).astype(x.dtype)  # (..., out) @ (out, in)
    d_weight = cotangent.reshape(-1, cotangent.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (out, N) @ (N, in)
    return dx, d_weight.astype(weight.dtype)


class Linear(nn.Linear):
    """`nn.Linear` through `linear` (same parameters, names and result; a row-major weight gradient)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = linear(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameter and result); for a few float32 rows on the CPU one native node instead of
    MLX's three."""

    def __call__(self, x: mx.array) -> mx.array:
        ext = native.usable_small(x, self["weight"])
        return ext.rms_norm(x, self["weight"], self.eps) if ext is not None else super().__call__(x)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class RoPE(nn.Module):
    """Rotary embedding on the decoupled key/query dims; interleaved pairs when `rope_interleave`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self._scale, _ = rope_parameters(config)
        self._wavelengths = mx.array(1 / inv_freq)
        self.dims = config.qk_rope_head_dim
        self.traditional = config.rope_interleave

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        ext = native.usable_small(x, self._wavelengths)
        if ext is not None:  # one node; mx.fast.rope's CPU fallback is 14 and recomputes cos/sin each call
            off = offset.astype(mx.int32) if isinstance(offset, mx.array) else mx.array(offset, mx.int32)
            return ext.rope(x, off, self._wavelengths, self.dims, self.traditional, self._scale)
        if self._scale != 1.0:  # rope is linear in x, so scaling x scales cos and sin
            x = x * self._scale
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                            freqs=self._wavelengths)
