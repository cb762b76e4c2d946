"""Decoder layer and the full DeepSeek-V3 model (main stack + MTP modules); no I/O here.

Attribute paths equal the HF tensor names (`model.layers.3.self_attn.kv_b_proj.weight`), the only difference
being that routed experts are stacked (`mlp.experts.gate_proj.weight`, `[E, I, D]`). MTP modules live at
`model.layers[num_hidden_layers + i]`, as in DeepSeek-V3 checkpoints.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .attention import MLA
from .layers import MLP, Linear, RMSNorm
from .moe import MoE, Routing


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size,
                                                                        config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x, mask="causal", cache=None, domain_ids=None, shared=None
                 ) -> tuple[mx.array, Routing | None]:
        """`shared`: the dict one forward pass hands every layer, for sparse-attention selections (MLA)."""
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, shared)
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
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, h: mx.array) -> mx.array:
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
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def step(self, hidden, embeds, mask="causal", cache=None, domain_ids=None):
        """(hidden (B, L, D), embeds of the next tokens (B, L, D)) -> (block output (B, L, D), routing)."""
        x = self.eh_proj(mx.concatenate([self.enorm(embeds), self.hnorm(hidden)], axis=-1))
        return super().__call__(x, mask, cache, domain_ids, {})


class Output(NamedTuple):
    logits: mx.array  # (B, T, V)
    hidden: mx.array  # (B, T, D) final hidden state after the last norm (what MTP consumes)
    routing: list[Routing]  # one per MoE layer of the main stack


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_hidden_layers = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        n = config.num_hidden_layers
        self.layers = [DecoderLayer(config, i) for i in range(n)] + [
            MTPLayer(config, n + i) for i in range(config.num_nextn_predict_layers)]
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return self.layers[self.num_hidden_layers:]

    def __call__(self, inputs, cache=None, domain_ids=None, mask="causal"):
        h = self.embed_tokens(inputs)
        routing, shared = [], {}
        for i, layer in enumerate(self.layers[: self.num_hidden_layers]):
            h, r = layer(h, mask, None if cache is None else cache[i], domain_ids, shared)
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
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def head(self, h: mx.array) -> mx.array:
        return self.lm_head(h) if "lm_head" in self else self.model.embed_tokens.as_linear(h)

    def forward(self, inputs: mx.array, cache: Any = None, domain_ids: mx.array | None = None,
                mask: Any = "causal") -> Output:
        """Full output: logits, final hidden state and per-MoE-layer routing (training, MTP)."""
        h, routing = self.model(inputs, cache, domain_ids, mask)
        return Output(self.head(h), h, routing)

    def __call__(self, inputs: mx.array, cache: Any = None, domain_ids: mx.array | None = None,
                 mask: Any = "causal") -> mx.array:
        return self.forward(inputs, cache, domain_ids, mask).logits

    def mtp_forward(self, hidden: mx.array, next_tokens: mx.array, depth: int = 0, cache: Any = None,
                    domain_ids: mx.array | None = None, mask: Any = "causal") -> Output:
        """MTP module `depth`: hidden (B, L, D) at positions t, next_tokens (B, L) = tokens t+depth+1.

        Returns logits for tokens t+depth+2 (B, L, V), the module's hidden state (input of the next depth)
        and its routing.
        """
        layer = self.model.mtp_layers[depth]
        h, routing = layer.step(hidden, self.model.embed_tokens(next_tokens), mask, cache, domain_ids)
        return Output(layer.shared_head(h), h, [routing] if routing is not None else [])

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers[: self.config.num_hidden_layers]
