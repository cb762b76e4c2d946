"""Multi-head Latent Attention (DeepSeek-V2/V3), naive and absorbed paths side by side.

Legend: B batch, L new tokens, S cached + new tokens, H heads, r kv_lora_rank, n qk_nope_head_dim,
p qk_rope_head_dim, v v_head_dim.

Naive: expand the latent into per-head keys/values with `kv_b_proj` (cheap when S is small: training,
prefill). Absorbed: fold `kv_b_proj` into the query and the output, so attention runs in the r-dim latent
space and only the normalised latent and the RoPE key are ever cached.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, RoPE, rope_parameters


def causal_mask(L: int, S: int, device: torch.device) -> torch.Tensor:
    """(L, S) bool: new token i (at position S-L+i) sees cached positions 0..S-L+i."""
    return (torch.arange(L, device=device)[:, None] + (S - L)) >= torch.arange(S, device=device)[None]


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.q_lora_rank = c.q_lora_rank
        self.kv_lora_rank = c.kv_lora_rank
        self.qk_nope_head_dim = c.qk_nope_head_dim
        self.qk_rope_head_dim = c.qk_rope_head_dim
        self.v_head_dim = c.v_head_dim
        H, dq = c.num_attention_heads, c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, H * dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=1e-6)  # HF uses the default eps here
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                            bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.rope = RoPE(c)
        self.scale = dq**-0.5 * rope_parameters(c)[2]
        # None: absorbed exactly when a cache is given (decode); True/False force a path.
        self.absorb: bool | None = None

    def forward(self, x: torch.Tensor, cache: Any = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); `mask` (B|1, 1, L, S) bool, True where a query may attend (training's document mask);
        None: causal."""
        B, L, _ = x.shape
        H, n, p, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, L, H, n + p).transpose(1, 2)  # (B, H, L, n+p)
        q_nope, q_pe = q[..., :n], q[..., n:]
        ckv = self.kv_a_proj_with_mqa(x)  # (B, L, r+p)
        latent = self.kv_a_layernorm(ckv[..., :r]).unsqueeze(1)  # (B, 1, L, r)
        k_pe = ckv[..., r:].unsqueeze(1)  # (B, 1, L, p)

        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe, offset)
        # mask None and no cache: plain causal over L == S (SDPA's is_causal), decided without inspecting shapes
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)  # (B, 1, S, r), (B, 1, S, p)
            if mask is None:
                mask = causal_mask(L, latent.shape[2], x.device)

        absorb = self.absorb if self.absorb is not None else cache is not None
        out = self._absorbed(q_nope, q_pe, latent, k_pe, mask) if absorb else self._naive(
            q_nope, q_pe, latent, k_pe, mask)  # (B, H, L, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * self.v_head_dim))

    def _naive(self, q_nope, q_pe, latent, k_pe, mask):
        B, H = q_nope.shape[:2]
        S, n = latent.shape[2], self.qk_nope_head_dim
        kv = self.kv_b_proj(latent[:, 0])  # (B, S, H*(n+v))
        kv = kv.view(B, S, H, n + self.v_head_dim).transpose(1, 2)  # (B, H, S, n+v)
        k = torch.cat([kv[..., :n], k_pe.expand(B, H, S, self.qk_rope_head_dim)], dim=-1)  # (B, H, S, n+p)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, L, n+p)
        return F.scaled_dot_product_attention(q, k, kv[..., n:], attn_mask=mask, is_causal=mask is None,
                                              scale=self.scale)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask):
        H, L, S = q_nope.shape[1], q_nope.shape[2], latent.shape[2]
        n = self.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(H, n + self.v_head_dim, self.kv_lora_rank)
        q_lat = q_nope @ w[:, :n]  # (B, H, L, n) @ (H, n, r) -> (B, H, L, r)
        scores = q_lat @ latent.transpose(-1, -2) + q_pe @ k_pe.transpose(-1, -2)  # (B, H, L, S)
        if mask is None:
            mask = causal_mask(L, S, q_nope.device)
        scores = (scores.float() * self.scale).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(latent.dtype)
        out = probs @ latent  # (B, H, L, S) @ (B, 1, S, r) -> (B, H, L, r)
        return out @ w[:, n:].transpose(-1, -2)  # (B, H, L, r) @ (H, r, v) -> (B, H, L, v)
