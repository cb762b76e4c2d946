"""Decoder layer and the full DeepSeek-V3 model (main stack + MTP modules) in PyTorch; no I/O here.

The twin of dh_mlx.model: the same config, the same attribute paths (= HF tensor names, routed experts
stacked as `mlp.experts.gate_proj.weight` `[E, I, D]`), the same numerics. MTP modules live at
`model.layers[num_hidden_layers + i]`, as in DeepSeek-V3 checkpoints.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import MLA
from .layers import MLP, RMSNorm
from .moe import IMPLS, Experts, MoE, Routing


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size,
                                                                        config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cache=None, domain_ids=None, mask=None) -> tuple[torch.Tensor, Routing | None]:
        h = x + self.self_attn(self.input_layernorm(x), cache, mask)
        hn = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(hn, domain_ids)
        else:
            y, routing = self.mlp(hn), None
        return h + y, routing


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))


class MTPLayer(DecoderLayer):
    """Multi-token prediction module (DeepSeek-V3 section 2.2), in vLLM's checkpoint layout.

    Depth-k input at position t: eh_proj(concat(enorm(embed(token[t+k])), hnorm(h[t]))), embedding first,
    then one decoder block; `shared_head` turns its output into logits for token t+k+1.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def step(self, hidden, embeds, cache=None, domain_ids=None, mask=None):
        """(hidden (B, L, D), embeds of the next tokens (B, L, D)) -> (block output (B, L, D), routing)."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        return super().forward(x, cache, domain_ids, mask)


class Output(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    hidden: torch.Tensor  # (B, T, D) final hidden state after the last norm (what MTP consumes)
    routing: list[Routing]  # one per MoE layer of the main stack


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_hidden_layers = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        n = config.num_hidden_layers
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(n)] + [
            MTPLayer(config, n + i) for i in range(config.num_nextn_predict_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.layers)[self.num_hidden_layers:]

    def forward(self, input_ids, cache=None, domain_ids=None, mask=None):
        h = self.embed_tokens(input_ids)
        routing = []
        for i in range(self.num_hidden_layers):
            h, r = self.layers[i](h, None if cache is None else cache[i], domain_ids, mask)
            if r is not None:
                routing.append(r)
        return self.norm(h), routing


class Model(nn.Module):
    """DeepSeek-V3 causal LM. `model(input_ids)` -> logits `(B, T, vocab)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lm_head"):
            return self.lm_head(h)
        return F.linear(h, self.model.embed_tokens.weight)

    def forward_full(self, input_ids: torch.Tensor, cache: Any = None, domain_ids: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> Output:
        """Logits, final hidden state and per-MoE-layer routing (training, MTP); `mask` (B, 1, T, T) bool, True
        where a token may attend (training's document mask, `step.document_mask`), None for causal."""
        h, routing = self.model(input_ids, cache, domain_ids, mask)
        return Output(self.head(h), h, routing)

    def forward(self, input_ids: torch.Tensor, cache: Any = None,
                domain_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) int64; domain_ids (B,) or (B, T), -1 = no domain -> logits (B, T, V)."""
        return self.forward_full(input_ids, cache, domain_ids).logits

    def mtp_forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor, depth: int = 0, cache: Any = None,
                    domain_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> Output:
        """MTP module `depth`: hidden (B, L, D) at positions t, next_tokens (B, L) = tokens t+depth+1.

        Returns logits for tokens t+depth+2 (B, L, V), the module's hidden state (input of the next depth)
        and its routing; `mask` as `forward_full`'s, over these L positions.
        """
        layer = self.model.mtp_layers[depth]
        h, routing = layer.step(hidden, self.model.embed_tokens(next_tokens), cache, domain_ids, mask)
        return Output(layer.shared_head(h), h, [routing] if routing is not None else [])

    def moe_layers(self) -> list[MoE]:
        """Every MoE block: the main stack's in order, then the MTP modules' (the order of the routing lists)."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    @property
    def layers(self) -> list[DecoderLayer]:
        return list(self.model.layers)[: self.config.num_hidden_layers]

    def init_buffers(self) -> "Model":
        """Recompute the non-checkpoint tables (RoPE frequencies, domain masks) after `to_empty`."""
        for m in self.modules():
            if m is not self and hasattr(m, "init_buffers"):
                m.init_buffers()
        return self

    def set_absorb(self, value: bool | None) -> None:
        """Force MLA's absorbed (True) or naive (False) path in every layer; None: absorbed iff cached."""
        for m in self.modules():
            if hasattr(m, "absorb"):
                m.absorb = value

    def set_experts_impl(self, impl: str) -> None:
        """Pick the routed-expert kernel in every MoE layer (see moe.Experts)."""
        if impl not in IMPLS:
            raise ValueError(f"experts impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, Experts):
                m.impl = impl
