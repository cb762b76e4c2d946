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


def _v4_layer(c, idx: int) -> tuple[int, int]:
    """(total, active) parameters of DeepSeek-V4 layer `idx` (config_v4.V4Config); the hash table is not a
    parameter (token id -> experts)."""
    D, H, d, qr, n, E, I = (c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank, c.hc_mult,
                            c.n_routed_experts, c.moe_intermediate_size)
    attn = D * qr + qr + qr * H * d + D * d + d + c.o_lora_rank * H * d + c.o_groups * c.o_lora_rank * D + H
    m = c.compress_rate(idx)
    if m:
        csa = c.layer_type(idx) == "compressed_sparse_attention"
        w = 2 * d if csa else d
        attn += 2 * D * w + m * w + d
        if csa:
            ci, h = c.index_head_dim, c.index_n_heads
            attn += 4 * D * ci + 2 * m * ci + ci + qr * h * ci + D * h
    hc = 2 * ((2 + n) * n * n * D + (2 + n) * n + 3)
    router = E * D + (E if c.mlp_layer_type(idx) == "moe" else 0)
    base = attn + hc + 2 * D + router + 3 * D * I
    return base + 3 * D * I * E, base + 3 * D * I * c.num_experts_per_tok


def count_params(c: ModelConfig) -> ParamCount:
    if c.model_type == "deepseek_v4":
        n, D, L = c.hc_mult, c.hidden_size, c.num_hidden_layers
        head = D + n * n * D + n + 1  # a final norm and a hyper-connection head
        outer = c.vocab_size * D * (1 if c.tie_word_embeddings else 2) + head
        layers = [_v4_layer(c, i) for i in range(L)]
        # an MTP module: a decoder layer, e_proj and h_proj, enorm and hnorm, and a head of its own (the
        # embedding and the LM head are the main model's)
        mtp = [_v4_layer(c, L + i) for i in range(c.num_nextn_predict_layers)]
        extra = 2 * D * D + 2 * D + head
        return ParamCount(outer + sum(t for t, _ in layers), outer + sum(a for _, a in layers),
                          sum(t + extra for t, _ in mtp), sum(a + extra for _, a in mtp))
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
    with a sparse-attention indexer its key (index_head_dim values). DeepSeek-V4 caches per token only its
    compressed entries: (head_dim + index_head_dim) / m per CSA layer, head_dim / m' per HCA layer (the sliding
    window is a constant, `v4_window_bytes`)."""
    if c.model_type == "deepseek_v4":
        per = 0.0
        for i in range(c.num_hidden_layers):
            m = c.compress_rate(i)
            if m:
                csa = c.layer_types[i] == "compressed_sparse_attention"
                per += (c.head_dim + (c.index_head_dim if csa else 0)) / m
        return round(per * dtype_bytes)
    return (c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) + indexer_cache_values(c)) * dtype_bytes


def indexer_cache_values(c: ModelConfig) -> int:
    """Values per token the sparse-attention indexers cache (their keys), over the main stack."""
    if not c.sparse_attention:
        return 0
    return sum(c.index_head_dim for i in range(c.num_hidden_layers) if c.has_indexer(i))


def v4_window_bytes(c, dtype_bytes: int = 2) -> int:
    """DeepSeek-V4's sliding windows: the last sliding_window keys (head_dim each) of every layer, at any length."""
    return c.num_hidden_layers * c.sliding_window * c.head_dim * dtype_bytes


def reference_kv_bytes_per_token(name: str, dtype_bytes: int = 2) -> int:
    layers, heads, head_dim = KV_REFERENCES[name]
    return layers * 2 * heads * head_dim * dtype_bytes


def weight_bytes(n_params: int, bits: int, group_size: int = 64) -> int:
    """Bytes for n_params at 32/16 bits, or MLX affine quantization (a scale and a bias per group, 16-bit)."""
    if bits >= 16:
        return n_params * bits // 8
    return n_params * bits // 8 + n_params // group_size * 4
