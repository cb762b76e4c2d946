"""Building blocks shared by every layer: RMSNorm, SwiGLU MLP, rotary embedding with DeepSeek's YaRN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the compute dtype, as transformers and MLX's fused kernel do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(config: ModelConfig) -> tuple[torch.Tensor, float, float]:
    """(inv_freq [rope_dim/2] float32, cos/sin scale, softmax-scale multiplier), as dh_mlx.model.layers does.

    YaRN blends interpolated and extrapolated frequencies with a linear ramp between the correction dims of
    `beta_fast` and `beta_slow` rotations, scales cos/sin by `attention_factor` (mscale/mscale_all_dim), and
    DeepSeek multiplies the softmax scale by mscale(factor, mscale_all_dim)^2.
    """
    d, base = config.qk_rope_head_dim, config.rope_theta
    wavelengths = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # 1 / inv_freq
    if config.rope_type != "yarn":
        return 1 / wavelengths, 1.0, 1.0
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
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1 / (factor * wavelengths)) * (1 - extrapolate) + (1 / wavelengths) * extrapolate
    softmax_mult = _yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return inv_freq, float(attention_factor), softmax_mult


class RoPE(nn.Module):
    """Rotary embedding on the decoupled dims: adjacent pairs when `rope_interleave`, else the two halves."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.interleave = config.rope_interleave
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the frequency table (not a checkpoint tensor; also after building on the meta device)."""
        inv_freq, self.scale, _ = rope_parameters(self.config)
        device = self.inv_freq.device if hasattr(self, "inv_freq") else None
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x (B, H, L, p) at positions offset..offset+L-1 -> rotated, same shape and dtype."""
        L = x.shape[-2]
        pos = torch.arange(L, device=x.device, dtype=torch.float32) + offset
        angles = pos[:, None] * self.inv_freq[None]  # (L, p/2)
        # rope is linear in x, so YaRN's attention factor can scale cos and sin
        cos, sin = angles.cos() * self.scale, angles.sin() * self.scale
        xf = x.float()
        if self.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)
