"""Building blocks shared by every layer: SwiGLU MLP and rotary embedding (frequencies from dh_mlx.rope)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from ..rope import rope_parameters


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one compiled kernel for every shape (on the CPU a vectorised exp, see _jit.py:
    ~1 ns per element instead of ~15 for the two separate ops)."""
    return nn.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

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
        if self._scale != 1.0:  # rope is linear in x, so scaling x scales cos and sin
            x = x * self._scale
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                            freqs=self._wavelengths)
