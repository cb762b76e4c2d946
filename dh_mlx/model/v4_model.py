"""DeepSeek-V4 (V4-Flash, V4-Pro): the decoder stack around V4Attention (model/v4_attention.py).

Legend: B batch, L tokens, n hc_mult residual streams, D hidden, E routed experts, k experts per token.

The residual is n streams (B, L, n, D). Before each block (attention, MoE) a hyper-connection reads the streams
and gives: `pre` weights collapsing them into the block's input, `post` weights spreading the block's output
back over them, and `comb`, an n x n mixing of the streams themselves projected to a doubly stochastic matrix
by Sinkhorn-Knopp iterations. The head collapses the streams once more. MoE layers score experts by
sqrt(softplus) (`scoring_func`); "hash_moe" layers take their experts from a token-id table, the others the
top k of score + selection bias; experts and the shared expert clamp SwiGLU's inputs at `swiglu_limit`. Names
and numbers as transformers' DeepseekV4ForCausalLM. The MTP modules (`MTPBlock`, which transformers does not
have: as DeepSeek's inference code composes them) live at `model.layers[num_hidden_layers + i]`, as
DeepSeek-V3's do.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config_v4 import V4Config
from .layers import Linear, RMSNorm
from .moe import SORT_THRESHOLD, Routing, StackedLinear
from .transformer import Output
from .v4_attention import V4Attention, unit_rms


class HyperConnection(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        n = config.hc_mult
        self.n, self.iters, self.hc_eps, self.eps = n, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = mx.zeros(((2 + n) * n, n * config.hidden_size))
        self.base = mx.zeros(((2 + n) * n,))
        self.scale = mx.ones((3,))

    def __call__(self, streams: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """streams (B, L, n, D) -> (post (B, L, n), comb (B, L, n, n), the block's input (B, L, D))."""
        B, L, n, _ = streams.shape
        flat = unit_rms(streams.reshape(B, L, -1).astype(mx.float32), self.eps)
        mix = flat @ self.fn.astype(mx.float32).T  # (B, L, (2 + n) n)
        base, scale = self.base.astype(mx.float32), self.scale.astype(mx.float32)
        pre = mx.sigmoid(mix[..., :n] * scale[0] + base[:n]) + self.hc_eps
        post = 2 * mx.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = mx.softmax(mix[..., 2 * n:].reshape(B, L, n, n) * scale[2] + base[2 * n:].reshape(n, n), axis=-1)
        comb = sinkhorn(comb + self.hc_eps, self.iters, self.hc_eps)
        collapsed = (pre[..., None] * streams).sum(axis=2).astype(streams.dtype)
        return post, comb, collapsed


def sinkhorn(comb: mx.array, iters: int, eps: float) -> mx.array:
    """Alternate column and row normalisation (columns first and last), towards a doubly stochastic matrix."""
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


class HyperHead(nn.Module):
    """The last collapse of the streams, before the final norm."""

    def __init__(self, config: V4Config):
        super().__init__()
        n = config.hc_mult
        self.hc_eps, self.eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = mx.zeros((n, n * config.hidden_size))
        self.hc_base = mx.zeros((n,))
        self.hc_scale = mx.ones((1,))

    def __call__(self, streams: mx.array) -> mx.array:
        B, L, n, _ = streams.shape
        flat = unit_rms(streams.reshape(B, L, -1).astype(mx.float32), self.eps)
        pre = mx.sigmoid((flat @ self.hc_fn.astype(mx.float32).T) * self.hc_scale.astype(mx.float32)
                         + self.hc_base.astype(mx.float32)) + self.hc_eps
        return (pre[..., None] * streams).sum(axis=2).astype(streams.dtype)


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    return nn.silu(mx.minimum(gate, limit)) * mx.clip(up, -limit, limit)


class SharedExpert(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        D, I = config.hidden_size, config.moe_intermediate_size
        self.limit = config.swiglu_limit
        self.gate_proj, self.up_proj = Linear(D, I, bias=False), Linear(D, I, bias=False)
        self.down_proj = Linear(I, D, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class Gate(nn.Module):
    """The router: expert scores from the token, the choice from them plus a selection bias, or (hash) from the
    token id. Mixing weights: the chosen scores renormalised, times routed_scaling_factor."""

    def __init__(self, config: V4Config, hashed: bool):
        super().__init__()
        E, k = config.n_routed_experts, config.num_experts_per_tok
        self.top_k, self.scoring, self.scaling = k, config.scoring_func, config.routed_scaling_factor
        self.weight = mx.zeros((E, config.hidden_size))
        if hashed:
            self.tid2eid = mx.zeros((config.vocab_size, k), mx.int32)
        else:
            self.e_score_correction_bias = mx.zeros((E,))

    def __call__(self, x: mx.array, ids: mx.array) -> Routing:
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T  # (B, L, E)
        if self.scoring == "sqrtsoftplus":
            scores = mx.sqrt(nn.softplus(logits))
        else:
            scores = mx.sigmoid(logits) if self.scoring == "sigmoid" else mx.softmax(logits, axis=-1)
        if "tid2eid" in self:
            indices = self.tid2eid[ids].astype(mx.int32)  # (B, L, k)
        else:
            choice = scores + self.e_score_correction_bias.astype(mx.float32)
            indices = mx.argpartition(-choice, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        indices = mx.stop_gradient(indices)
        w = mx.take_along_axis(scores, indices, axis=-1)
        return Routing(indices, w / (w.sum(axis=-1, keepdims=True) + 1e-20) * self.scaling, scores)


class Experts(nn.Module):
    """Stacked routed experts (`[E, out, in]`), gather_mm'd; their SwiGLU inputs clamped."""

    def __init__(self, config: V4Config):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.limit = config.swiglu_limit
        self.gate_proj, self.up_proj = StackedLinear(E, D, I), StackedLinear(E, D, I)
        self.down_proj = StackedLinear(E, I, D)

    def __call__(self, x: mx.array, routing: Routing) -> mx.array:
        """x (B, L, D) -> sum over each token's k experts, weighted (B, L, D)."""
        *lead, D = x.shape
        k = routing.indices.shape[-1]
        xf, idx = x.reshape(-1, 1, 1, D), routing.indices.reshape(-1, k)
        N = xf.shape[0]
        sort = N * k >= SORT_THRESHOLD  # read each expert's weights once (as moe.routed_experts does)
        if sort:
            flat = idx.flatten()
            order = mx.argsort(flat)
            xf, idx = xf.reshape(N, 1, D)[order // k], flat[order]
        h = clamped_swiglu(self.gate_proj(xf, idx, sort), self.up_proj(xf, idx, sort), self.limit)
        y = self.down_proj(h, idx, sort)
        y = y[mx.argsort(order)] if sort else y
        y = y.reshape(*lead, k, D)
        return (y * routing.weights[..., None].astype(y.dtype)).sum(axis=-2)


class MoE(nn.Module):
    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        self.gate = Gate(config, config.mlp_layer_type(layer_idx) == "hash_moe")
        self.experts = Experts(config)
        self.shared_experts = SharedExpert(config)

    def __call__(self, x: mx.array, ids: mx.array) -> tuple[mx.array, Routing]:
        routing = self.gate(x, ids)
        return self.experts(x, routing) + self.shared_experts(x), routing


class DecoderLayer(nn.Module):
    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        self.self_attn = V4Attention(config, layer_idx)
        self.mlp = MoE(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn_hc = HyperConnection(config)
        self.ffn_hc = HyperConnection(config)

    def __call__(self, streams: mx.array, ids: mx.array, cache: Any = None, mask: Any = "causal"
                 ) -> tuple[mx.array, Routing]:
        """streams (B, L, n, D) -> (B, L, n, D); comb mixes the streams as comb^T @ streams. `mask`: "causal"
        or a document mask (B, 1, L, L) bool."""
        post, comb, x = self.attn_hc(streams)
        y = self.self_attn(self.input_layernorm(x), cache, mask)
        streams = post.astype(y.dtype)[..., None] * y[..., None, :] + comb.astype(y.dtype).swapaxes(-1, -2) @ streams
        post, comb, x = self.ffn_hc(streams)
        y, routing = self.mlp(self.post_attention_layernorm(x), ids)
        streams = post.astype(y.dtype)[..., None] * y[..., None, :] + comb.astype(y.dtype).swapaxes(-1, -2) @ streams
        return streams, routing


class MTPBlock(DecoderLayer):
    """A multi-token-prediction module, as DeepSeek's V4 inference code (`MTPBlock`) composes it: at position t,
    the main model's streams h[t] and the embedding of token t + 1 become the block's input streams
    h_proj(hnorm(h[t])) + e_proj(enorm(embed)) (the embedding's projection added to every stream); the block's
    output collapses through the module's own hyper-connection head and norm into the shared LM head, logits
    for token t + 2. Layer `num_hidden_layers + i`: its attention and MoE follow `mtp_layer_types`."""

    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__(config, layer_idx)
        D = config.hidden_size
        self.e_proj, self.h_proj = Linear(D, D, bias=False), Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(D, eps=config.rms_norm_eps)
        self.norm = RMSNorm(D, eps=config.rms_norm_eps)
        self.hc_head = HyperHead(config)

    def step(self, streams: mx.array, embeds: mx.array, ids: mx.array, cache: Any = None, mask: Any = "causal"
             ) -> tuple[mx.array, Routing]:
        """(streams (B, L, n, D) at positions t, embeds (B, L, D) and ids (B, L) of tokens t + 1) -> (the block's
        output streams (B, L, n, D), routing)."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(embeds))[:, :, None]
        return super().__call__(x, ids, cache, mask)


class V4Stack(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        n = self.num_hidden_layers = config.num_hidden_layers
        self.hc_mult = config.hc_mult
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(n)] + [
            MTPBlock(config, n + i) for i in range(config.num_nextn_predict_layers)]
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hc_head = HyperHead(config)

    @property
    def mtp_layers(self) -> list[MTPBlock]:
        return self.layers[self.num_hidden_layers:]

    def __call__(self, inputs, cache=None, domain_ids=None, mask="causal") -> tuple[mx.array, list[Routing]]:
        """inputs (B, L) -> (the residual streams after the last layer (B, L, n, D): what MTP reads, routing)."""
        h = self.embed_tokens(inputs)  # (B, L, D)
        streams = mx.broadcast_to(h[:, :, None], (*h.shape[:2], self.hc_mult, h.shape[-1]))
        routing = []
        for i, layer in enumerate(self.layers[: self.num_hidden_layers]):
            streams, r = layer(streams, inputs, None if cache is None else cache[i], mask)
            routing.append(r)
        return streams, routing


class V4Model(nn.Module):
    """DeepSeek-V4 causal LM: `model(input_ids)` -> logits `(B, T, vocab)`; the same calls as `Model`'s. Its
    `Output.hidden` is the residual streams (B, T, n, D), what its MTP modules read."""

    fixed_capacity_steps = False  # its caches are not latent buffers: generation decodes eagerly

    def __init__(self, config: V4Config):
        super().__init__()
        self.config = config
        self.model = V4Stack(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def head(self, h: mx.array) -> mx.array:
        return self.lm_head(h) if "lm_head" in self else self.model.embed_tokens.as_linear(h)

    def forward(self, inputs: mx.array, cache: Any = None, domain_ids: Any = None, mask: Any = "causal") -> Output:
        streams, routing = self.model(inputs, cache, mask=mask)
        return Output(self.head(self.model.norm(self.model.hc_head(streams))), streams, routing)

    def __call__(self, inputs: mx.array, cache: Any = None, domain_ids: Any = None, mask: Any = "causal"):
        return self.forward(inputs, cache, mask=mask).logits

    def mtp_forward(self, hidden: mx.array, next_tokens: mx.array, depth: int = 0, cache: Any = None,
                    domain_ids: Any = None, mask: Any = "causal") -> Output:
        """MTP module `depth`: hidden (B, L, n, D) streams at positions t, next_tokens (B, L) = tokens t+depth+1
        -> logits for tokens t+depth+2, the module's streams (the next depth's input) and its routing."""
        layer = self.model.mtp_layers[depth]
        streams, routing = layer.step(hidden, self.model.embed_tokens(next_tokens), next_tokens, cache, mask)
        return Output(self.head(layer.norm(layer.hc_head(streams))), streams, [routing])

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers[: self.config.num_hidden_layers]
