"""Building blocks shared by every layer: linear, RMS norm, SwiGLU MLP and rotary embedding.

`linear`, `rms_norm`, `swiglu` and `rope` are replaceable operations (dh_mlx.ops): a backend may run them
faster, with the same value and gradient.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from ..ops import replaceable
from ..rope import rope_parameters


@replaceable("linear")
def linear(x: mx.array, weight: mx.array) -> mx.array:
    """x (..., in) @ weight (out, in).T -> (..., out), as `nn.Linear` computes it."""
    return x @ weight.T


@replaceable("rms_norm")
def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


@replaceable("swiglu")
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


@replaceable("rope")
def rope(x: mx.array, offset: int | mx.array, wavelengths: mx.array, dims: int, traditional: bool,
         scale: float) -> mx.array:
    """Rotary embedding of x (..., L, d)'s first `dims` dims at positions offset.., cos and sin times `scale`."""
    if scale != 1.0:  # rope is linear in x, so scaling x scales cos and sin
        x = x * scale
    return mx.fast.rope(x, dims, traditional=traditional, base=None, scale=1.0, offset=offset, freqs=wavelengths)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, names and result) through the replaceable `linear`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = linear(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameter and result) through the replaceable `rms_norm`."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self["weight"], self.eps)


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
        return rope(x, offset, self._wavelengths, self.dims, self.traditional, self._scale)
