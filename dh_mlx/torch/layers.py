"""Building blocks shared by every layer: RMSNorm, SwiGLU MLP, rotary embedding with DeepSeek's YaRN."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..rope import rope_parameters as _rope_parameters


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


def rope_parameters(config: ModelConfig) -> tuple[torch.Tensor, float, float]:
    """(inv_freq float32 tensor, cos/sin scale, softmax-scale multiplier): dh_mlx.rope's, as a tensor."""
    inv_freq, scale, softmax_mult = _rope_parameters(config)
    return torch.from_numpy(inv_freq), scale, softmax_mult


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
