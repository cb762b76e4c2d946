"""Rotary-embedding frequencies with DeepSeek's YaRN, from a config alone (numpy; shared by MLX and the twin)."""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(config: ModelConfig) -> tuple[np.ndarray, float, float]:
    """(inv_freq [rope_dim/2] float32, cos/sin scale, softmax-scale multiplier) as transformers computes them.

    YaRN blends interpolated and extrapolated frequencies with a linear ramp between the correction dims of
    `beta_fast` and `beta_slow` rotations, scales cos/sin by `attention_factor` (mscale/mscale_all_dim), and
    DeepSeek multiplies the softmax scale by mscale(factor, mscale_all_dim)^2.
    """
    d, base = config.qk_rope_head_dim, config.rope_theta
    wavelengths = np.float32(base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))  # 1 / inv_freq
    if config.rope_type != "yarn":
        return (1 / wavelengths).astype(np.float32), 1.0, 1.0
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
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1 / (np.float32(factor) * wavelengths)) * (1 - extrapolate) + (1 / wavelengths) * extrapolate
    softmax_mult = _yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return inv_freq.astype(np.float32), float(attention_factor), softmax_mult
