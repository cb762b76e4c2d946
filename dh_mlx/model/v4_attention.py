"""DeepSeek-V4 attention: one shared key/value head over a sliding window plus compressed entries, with per-head
attention sinks, RoPE on each head's trailing dims (undone on the output), and a grouped low-rank output
projection. Numbers as transformers' DeepseekV4Attention computes them.

Legend: B batch, L new tokens, H heads, d head_dim, p rotary dims (the last p of a head), W sliding window,
m source tokens per compressed entry, T compressed entries, h / c the indexer's heads / head dim, k index_topk.

Compressed entries: each window of m source tokens becomes one d-wide entry, a softmax-gated sum of their
projections (with a learned bias per slot) under an RMS norm, rotated at the window's first position. HCA
windows are disjoint and every finished one is visible. CSA entries span two windows (the previous window's
first half-projection and this window's second) and a lightning indexer picks the k entries each query sees.
A query at position t sees entry w only once w's window has ended: w < (t + 1) // m. A document mask (training on
packed rows: query t sees token s only inside its document) hides, besides keys, the entries with a source token
outside the query's document (their windows' first tokens, the previous window's for CSA's overlapping entries).

`cache` (generation/v4_cache.py) keeps the last W - 1 keys, the entries emitted so far, and each compressor's
unfinished window; without one, the whole input is one pass (its incomplete last window is never emitted).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config_v4 import V4Config
from ..rope import rope_parameters
from .indexer import index_scores
from .layers import Linear, RMSNorm


class Rotary:
    """V4's interleaved RoPE on the trailing p dims, at positions (offset + i) * stride, or undone (inverse)."""

    def __init__(self, config: V4Config, kind: str):
        inv_freq, self.factor, _ = rope_parameters(config.rope_config(kind))
        self.wavelengths, self.p = mx.array(1 / inv_freq), config.qk_rope_head_dim

    def __call__(self, x: mx.array, offset: int, stride: int = 1, inverse: bool = False) -> mx.array:
        p = self.p
        rot = x[..., -p:].astype(mx.float32) * self.factor
        rot = mx.fast.rope(rot, p, traditional=True, base=None, scale=-float(stride) if inverse else float(stride),
                           offset=offset, freqs=self.wavelengths).astype(x.dtype)
        return mx.concatenate([x[..., :-p], rot], axis=-1)


def unit_rms(x: mx.array, eps: float) -> mx.array:
    """x / rms(x) over the last axis (no gain), the statistic in float32."""
    return x * mx.rsqrt(mx.mean(mx.square(x.astype(mx.float32)), axis=-1, keepdims=True) + eps).astype(x.dtype)


class Compressor(nn.Module):
    """One compressed entry per window of m source tokens. `overlap` (CSA): projections twice as wide, an entry
    mixing the previous window's first halves with this window's second halves (2m slots)."""

    def __init__(self, config: V4Config, dim: int, rate: int, overlap: bool, rope: Rotary):
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.rate, self.overlap, self.rope = dim, rate, overlap, rope
        self.kv_proj = Linear(config.hidden_size, width, bias=False)
        self.gate_proj = Linear(config.hidden_size, width, bias=False)
        self.position_bias = mx.zeros((rate, width))
        self.kv_norm = RMSNorm(dim, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, state: Any) -> mx.array:
        """x (B, L, D) -> every entry emitted so far (B, T, dim): with `state`, those before this call too."""
        B, m, c = x.shape[0], self.rate, self.dim
        kv, gate = self.kv_proj(x), self.gate_proj(x)  # (B, L, width)
        first = 0
        if state is not None:  # the unfinished window of the last call goes first
            first = state.count * m
            if state.buffer is not None:
                kv, gate = mx.concatenate([state.buffer[0], kv], 1), mx.concatenate([state.buffer[1], gate], 1)
        n = kv.shape[1] // m
        if state is not None:
            state.buffer, state.rate = (kv[:, n * m:], gate[:, n * m:]), m
        if n == 0:
            new = mx.zeros((B, 0, c), x.dtype)
        else:
            rows = (kv, gate)
            kv = kv[:, : n * m].reshape(B, n, m, -1)
            gate = gate[:, : n * m].reshape(B, n, m, -1) + self.position_bias
            if state is not None:  # what taking these windows back needs (V4LayerCache.trim)
                state.close(n, rows, (kv, gate) if self.overlap else None)
            if self.overlap:
                kv, gate = self._overlap(kv, gate, state)
            weights = mx.softmax(gate.astype(mx.float32), axis=2).astype(kv.dtype)
            new = self.kv_norm((kv * weights).sum(axis=2))  # (B, n, dim)
            new = self.rope(new, first // m, stride=m)  # at each window's first position
        if state is None:
            return new
        state.entries = new if state.entries is None else mx.concatenate([state.entries, new], axis=1)
        state.count += n
        return state.entries

    def _overlap(self, kv: mx.array, gate: mx.array, state: Any) -> tuple[mx.array, mx.array]:
        """(B, n, m, 2c) -> the 2m slots of each entry (B, n, 2m, c): the previous window's first halves (zero,
        with weight 0, before the first window), then this window's second halves."""
        B, n, m, _ = kv.shape
        c = self.dim
        prior = None if state is None else state.overlap
        if prior is None:
            prior = (mx.zeros((B, 1, m, c), kv.dtype), mx.full((B, 1, m, c), -mx.inf, gate.dtype))
        if state is not None:
            state.overlap = (kv[:, -1:, :, :c], gate[:, -1:, :, :c])
        prev_kv = mx.concatenate([prior[0], kv[:, :-1, :, :c]], axis=1)
        prev_gate = mx.concatenate([prior[1], gate[:, :-1, :, :c]], axis=1)
        return (mx.concatenate([prev_kv, kv[..., c:]], axis=2), mx.concatenate([prev_gate, gate[..., c:]], axis=2))


def visible(entries: int, rate: int, offset: int, L: int) -> mx.array:
    """(L, T) bool: query offset + i sees entry w once w's window has ended."""
    return mx.arange(entries)[None] < ((mx.arange(L) + offset + 1) // rate)[:, None]


class Scorer(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        self.weights_proj = Linear(config.hidden_size, config.index_n_heads, bias=False)


class Indexer(Compressor):
    """CSA's lightning indexer: entries of its own (c wide, compressed as the attention's are), scored against
    each query, the best k kept."""

    def __init__(self, config: V4Config, rate: int, rope: Rotary):
        super().__init__(config, config.index_head_dim, rate, True, rope)
        self.n_heads, self.topk = config.index_n_heads, config.index_topk
        self.q_b_proj = Linear(config.q_lora_rank, self.n_heads * self.dim, bias=False)
        self.scorer = Scorer(config)

    def __call__(self, x: mx.array, q_latent: mx.array, offset: int, state: Any, documents: Any = None
                 ) -> mx.array:
        """(B, L, min(k, T)) chosen entries per query, -1 where the query may not see the entry; `documents`
        (B, 1, L, T) bool: the entries inside each query's document."""
        B, L, _ = x.shape
        keys = super().__call__(x, state)  # (B, T, c)
        T, k = keys.shape[1], min(self.topk, keys.shape[1])
        if k == 0:
            return mx.zeros((B, L, 0), mx.int32)
        q = self.q_b_proj(q_latent).reshape(B, L, self.n_heads, self.dim).transpose(0, 2, 1, 3)  # (B, h, L, c)
        q = self.rope(q, offset)
        w = self.scorer.weights_proj(x).astype(mx.float32) * (self.n_heads**-0.5 * self.dim**-0.5)
        seen = visible(T, self.rate, offset, L)[None, None]  # (1, 1, L, T)
        seen = seen if documents is None else seen & documents
        scores = index_scores(q, keys[:, None], w, seen)  # (B, L, T), -inf where not seen
        top = (mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k] if k < T else mx.broadcast_to(
            mx.arange(k), (B, L, k))).astype(mx.int32)
        ok = mx.take_along_axis(mx.broadcast_to(seen[:, 0], (B, L, T)), top, axis=-1)
        return mx.stop_gradient(mx.where(ok, top, -1))


class V4Attention(nn.Module):
    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        c = config
        H, d = c.num_attention_heads, c.head_dim
        self.num_heads, self.head_dim, self.window, self.o_groups = H, d, c.sliding_window, c.o_groups
        self.eps, self.scale = c.rms_norm_eps, d**-0.5
        rate = c.compress_rate(layer_idx)
        self.rope = Rotary(c, "compress" if rate else "main")
        self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(c.q_lora_rank, eps=c.rms_norm_eps)
        self.q_b_proj = Linear(c.q_lora_rank, H * d, bias=False)
        self.kv_proj = Linear(c.hidden_size, d, bias=False)
        self.kv_norm = RMSNorm(d, eps=c.rms_norm_eps)
        self.o_a_proj = Linear(H * d // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)  # g blocks
        self.o_b_proj = Linear(c.o_groups * c.o_lora_rank, c.hidden_size, bias=False)
        self.sinks = mx.zeros((H,))
        self.kind = c.layer_type(layer_idx)
        if rate:
            self.compressor = Compressor(c, d, rate, self.kind == "compressed_sparse_attention", self.rope)
            if self.kind == "compressed_sparse_attention":
                self.compressor.indexer = Indexer(c, rate, self.rope)

    def __call__(self, x: mx.array, cache: Any = None, mask: Any = None) -> mx.array:
        """x (B, L, D) -> (B, L, D); `mask` (B, 1, L, L) bool, a document mask over the whole input (no cache)."""
        B, L, _ = x.shape
        H, d = self.num_heads, self.head_dim
        offset = 0 if cache is None else cache.offset
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = unit_rms(self.q_b_proj(q_latent).reshape(B, L, H, d).transpose(0, 2, 1, 3), self.eps)  # (B, H, L, d)
        q = self.rope(q, offset)
        kv = self.rope(self.kv_norm(self.kv_proj(x))[:, None], offset)  # (B, 1, L, d): key and value
        keys, start = (kv, offset) if cache is None else cache.window_keys(kv, self.window)
        kpos = mx.arange(keys.shape[2]) + start
        qpos = mx.arange(L)[:, None] + offset
        bias = mx.where((kpos[None] <= qpos) & (kpos[None] > qpos - self.window), 0.0, -mx.inf)  # (L, Kw)
        bias = mx.broadcast_to(bias, (B, 1, L, keys.shape[2]))
        # (with a cache, generation: the cache's own positions decide; a mask there is not a document mask)
        documents = None if isinstance(mask, str) or mask is None or cache is not None else mask
        if documents is not None:
            bias = mx.where(documents, bias, -mx.inf)
        if "compressor" in self:
            entries, entry_bias = self._compressed(x, q_latent, offset, cache, documents)
            keys = mx.concatenate([keys, entries[:, None]], axis=2)
            bias = mx.concatenate([bias, entry_bias], axis=-1)
        out = attend_with_sinks(q, keys, self.sinks, self.scale, bias)  # (B, H, L, d)
        out = self.rope(out, offset, inverse=True)  # the value's rotation undone at the query's position
        g = self.o_groups
        grouped = out.transpose(0, 2, 1, 3).reshape(B, L, g, H * d // g)
        return self.o_b_proj(grouped_linear(self.o_a_proj, grouped))

    def _compressed(self, x, q_latent, offset, cache, documents) -> tuple[mx.array, mx.array]:
        """(entries (B, T, d), their additive mask (B, 1, L, T))."""
        B, L, _ = x.shape
        comp = self.compressor
        entries = comp(x, None if cache is None else cache.state("compressor"))
        T = entries.shape[1]
        inside = None
        if documents is not None:  # each entry's first source token in the query's document
            first = mx.maximum(mx.arange(T) - (1 if comp.overlap else 0), 0) * comp.rate
            inside = documents[..., first]  # (B, 1, L, T)
        if "indexer" not in comp:  # HCA: every finished window
            seen = visible(T, comp.rate, offset, L)
            seen = seen if inside is None else seen & inside
            return entries, mx.broadcast_to(mx.where(seen, 0.0, -mx.inf), (B, 1, L, T))
        top = comp.indexer(x, q_latent, offset, None if cache is None else cache.state("indexer"), inside)
        chosen = mx.put_along_axis(mx.zeros((B, L, T + 1), mx.bool_), mx.where(top >= 0, top, T),
                                   mx.array(True), axis=-1)[..., :T]  # -1 (not visible) lands past the end
        return entries, mx.where(chosen, 0.0, -mx.inf)[:, None]


def grouped_linear(proj: nn.Module, x: mx.array) -> mx.array:
    """x (B, L, g, n) -> (B, L, g * r): group i through rows i*r..(i+1)*r of `proj` (g blocks of an (g r, n)
    matrix). A quantized matrix's rows are quantized independently, so each block is a quantized matrix too."""
    B, L, g, n = x.shape
    if isinstance(proj, nn.QuantizedLinear):
        r = proj.weight.shape[0] // g
        return mx.concatenate([mx.quantized_matmul(
            x[:, :, i], proj.weight[i * r:(i + 1) * r], proj.scales[i * r:(i + 1) * r],
            proj.biases[i * r:(i + 1) * r], transpose=True, group_size=proj.group_size, bits=proj.bits,
            mode=proj.mode) for i in range(g)], axis=-1)
    w = proj.weight.reshape(g, -1, n)  # (g, r, n); a LoRA-wrapped matrix gives its adapted weight
    return (x[..., None, :] @ w.swapaxes(-1, -2).astype(x.dtype)).reshape(B, L, -1)


def attend_with_sinks(q: mx.array, keys: mx.array, sinks: mx.array, scale: float, bias: mx.array) -> mx.array:
    """softmax over the keys and one learned logit per head (its weight dropped), keys also the values:
    q (B, H, L, d), keys (B, 1, K, d), sinks (H,), bias (B, 1, L, K) additive."""
    B, H, L, _ = q.shape
    logits = (q @ keys.swapaxes(-1, -2)).astype(mx.float32) * scale + bias  # (B, H, L, K)
    sink = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, H, 1, 1), (B, H, L, 1))
    p = mx.softmax(mx.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    return p.astype(keys.dtype) @ keys
