"""Building blocks shared by every layer: SwiGLU MLP and rotary embedding with DeepSeek's YaRN."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(config: ModelConfig) -> tuple[mx.array, float, float]:
    """(wavelengths [rope_dim/2], cos/sin scale, softmax-scale multiplier) as transformers computes them.

    YaRN blends interpolated and extrapolated frequencies with a linear ramp between the correction dims of
    `beta_fast` and `beta_slow` rotations, scales cos/sin by `attention_factor` (mscale/mscale_all_dim), and
    DeepSeek multiplies the softmax scale by mscale(factor, mscale_all_dim)^2.
    """
    d, base = config.qk_rope_head_dim, config.rope_theta
    exponents = mx.arange(0, d, 2, dtype=mx.float32) / d
    wavelengths = base**exponents  # 1 / inv_freq
    if config.rope_type != "yarn":
        return wavelengths, 1.0, 1.0
    rs = config.rope_scaling
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(d // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1 / (factor * wavelengths)) * (1 - extrapolate) + (1 / wavelengths) * extrapolate
    softmax_mult = _yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return 1 / inv_freq, float(attention_factor), softmax_mult


class RoPE(nn.Module):
    """Rotary embedding on the decoupled key/query dims; interleaved pairs when `rope_interleave`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self._wavelengths, self._scale, _ = rope_parameters(config)
        self.dims = config.qk_rope_head_dim
        self.traditional = config.rope_interleave

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self._scale != 1.0:  # rope is linear in x, so scaling x scales cos and sin
            x = x * self._scale
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                            freqs=self._wavelengths)
