"""Parameter, KV-cache and weight-memory arithmetic from a config alone (no arrays allocated)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

# Reference dense models for the KV comparison: (layers, kv heads, head dim), K and V both cached.
KV_REFERENCES = {"Llama-3.2-3B": (28, 8, 128), "Phi-3-mini": (32, 32, 96)}
CONTEXTS = {"4K": 4096, "32K": 32768, "128K": 131072}


@dataclass(frozen=True)
class ParamCount:
    total: int  # main model (embeddings, every expert, head), MTP excluded
    active: int  # what one token touches in the main model: all but the unchosen routed experts
    mtp: int  # MTP modules (their embedding is shared with the main model and not counted again)
    mtp_active: int


def _indexer(c: ModelConfig, idx: int) -> int:
    """The sparse-attention indexer of layer `idx`: wq_b, wk, k_norm (weight and bias), weights_proj."""
    if not c.has_indexer(idx):
        return 0
    h, d = c.index_n_heads, c.index_head_dim
    return c.q_lora_rank * h * d + c.hidden_size * d + 2 * d + c.hidden_size * h


def _attention(c: ModelConfig, idx: int = 0) -> int:
    H, D, dq = c.num_attention_heads, c.hidden_size, c.qk_head_dim
    bias = c.attention_bias
    if c.q_lora_rank is None:
        q = D * H * dq
    else:
        q = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * dq + (c.q_lora_rank if bias else 0)
    kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * H * (
        c.qk_nope_head_dim + c.v_head_dim)
    if bias:
        kv += c.kv_lora_rank + c.qk_rope_head_dim
    o = H * c.v_head_dim * D + (D if bias else 0)
    return q + kv + o + _indexer(c, idx)


def _layer(c: ModelConfig, idx: int) -> tuple[int, int]:
    """(total, active) parameters of decoder layer `idx`."""
    D = c.hidden_size
    base = _attention(c, idx) + 2 * D
    if not c.is_moe_layer(idx):
        ffn = 3 * D * c.intermediate_size
        return base + ffn, base + ffn
    E, k, I = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
    router = E * D + (E if c.topk_method == "noaux_tc" else 0)
    shared = 3 * D * I * (c.n_shared_experts or 0)
    return base + router + shared + 3 * D * I * E, base + router + shared + 3 * D * I * k


def count_params(c: ModelConfig) -> ParamCount:
    D, V = c.hidden_size, c.vocab_size
    outer = V * D + D + (0 if c.tie_word_embeddings else V * D)  # embedding, final norm, head
    total = active = outer
    for i in range(c.num_hidden_layers):
        t, a = _layer(c, i)
        total, active = total + t, active + a
    mtp = mtp_active = 0
    for i in range(c.num_nextn_predict_layers):
        t, a = _layer(c, c.num_hidden_layers + i)
        extra = 2 * D + 2 * D * D + D + V * D  # enorm, hnorm, eh_proj, shared_head.norm, shared_head.head
        mtp, mtp_active = mtp + t + extra, mtp_active + a + extra
    return ParamCount(total, active, mtp, mtp_active)


def kv_bytes_per_token(c: ModelConfig, dtype_bytes: int = 2) -> int:
    """MLA caches the normalised latent and the shared RoPE key per layer: L x (r + p) values, and each layer
    with a sparse-attention indexer its key (index_head_dim values)."""
    return (c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) + indexer_cache_values(c)) * dtype_bytes


def indexer_cache_values(c: ModelConfig) -> int:
    """Values per token the sparse-attention indexers cache (their keys), over the main stack."""
    return sum(c.index_head_dim for i in range(c.num_hidden_layers) if c.has_indexer(i))


def reference_kv_bytes_per_token(name: str, dtype_bytes: int = 2) -> int:
    layers, heads, head_dim = KV_REFERENCES[name]
    return layers * 2 * heads * head_dim * dtype_bytes


def weight_bytes(n_params: int, bits: int, group_size: int = 64) -> int:
    """Bytes for n_params at 32/16 bits, or MLX affine quantization (a scale and a bias per group, 16-bit)."""
    if bits >= 16:
        return n_params * bits // 8
    return n_params * bits // 8 + n_params // group_size * 4
