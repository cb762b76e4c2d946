"""DeepSeek Sparse Attention at long context: decode time per token of one attention layer with DeepSeek-V3.2's
release shapes, at 4K, 16K and 64K cached positions, sparse (the lightning indexer picks index_topk = 2048
positions; attention reads those) beside dense MLA (the same layer attending to every position), and the
indexer's own scoring alone.

One layer, not the model: the MoE and the other layers cost the same at every context length, and 61 layers of
V3.2 do not fit here. The cache (latent, RoPE key, indexer key) is filled with random values of the given length
(decode cost depends only on the length); each step is the layer's absorbed decode, the cache trimmed back
after it. Prints one JSON object per result.

    python benchmarks/sparse_attention.py [--lengths 4096,16384,65536] [--steps 8] [--topk 2048]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import dh_mlx  # noqa: F401
from dh_mlx import backend
import mlx.core as mx
from mlx.utils import tree_flatten

from dh_mlx.config import ModelConfig
from dh_mlx.generation.cache import LatentCache
from dh_mlx.model.attention import MLA

# DeepSeek-V3.2's attention (config.json of deepseek-ai/DeepSeek-V3.2)
V32 = dict(model_type="deepseek_v32", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
           moe_intermediate_size=2048, num_hidden_layers=1, num_attention_heads=128, kv_lora_rank=512,
           q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256,
           num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=1, index_head_dim=128,
           index_n_heads=64, max_position_embeddings=163840,
           rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def cpu() -> str:
    for line in open("/proc/cpuinfo") if platform.system() == "Linux" else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def emit(name, value, unit, **fields):
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **fields}), flush=True)


def layer(config: ModelConfig) -> MLA:
    """One attention layer, random N(0, 0.02) weights (unit norms), on the absorbed (decode) path."""
    attn = MLA(config, 0)
    flat = tree_flatten(attn.parameters())
    std, keys = config.initializer_range, mx.random.split(mx.random.key(0), len(flat))
    new = []
    for (path, a), key in zip(flat, keys):
        leaf = path.rsplit(".", 1)[-1]
        if "norm" in path and leaf == "weight":
            new.append((path, mx.ones(a.shape)))
        elif leaf == "bias":
            new.append((path, mx.zeros(a.shape)))
        else:
            new.append((path, mx.random.normal(a.shape, key=key) * std))
    attn.load_weights(new)
    attn.absorb = True
    mx.eval(attn.parameters())
    return attn


def filled(config: ModelConfig, length: int) -> LatentCache:
    cache, key = LatentCache(), mx.random.key(1)
    k1, k2, k3 = mx.random.split(key, 3)
    cache.update_and_fetch(mx.random.normal((1, 1, length, config.kv_lora_rank), key=k1),
                           mx.random.normal((1, 1, length, config.qk_rope_head_dim), key=k2))
    if config.sparse_attention:
        cache.update_index(mx.random.normal((1, 1, length, config.index_head_dim), key=k3))
    mx.eval(cache.latent, cache.k_pe, cache.index_k if cache.index_k is not None else cache.latent)
    return cache


def per_token_ms(fn, cache: LatentCache) -> float:
    """ms of one call, the cache trimmed back to its length after it."""
    tic = time.perf_counter()
    mx.eval(fn())
    ms = (time.perf_counter() - tic) * 1e3
    cache.trim(1)
    return ms


def medians(paths: dict, steps: int) -> dict:
    """Median ms per token of each path, the paths interleaved step by step (a shared machine's load falls on
    all of them alike), after two warm-up steps each."""
    times = {name: [] for name in paths}
    for i in range(steps + 2):
        for name, (fn, cache) in paths.items():
            ms = per_token_ms(fn, cache)
            if i >= 2:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2048)
    args = ap.parse_args()
    backend.setup()
    sparse_cfg = ModelConfig(**V32, index_topk=args.topk)
    dense_cfg = ModelConfig(**{**V32, "model_type": "deepseek_v3"})
    sparse, dense = layer(sparse_cfg), layer(dense_cfg)
    dense.update({k: v for k, v in sparse.parameters().items() if k != "indexer"})  # the same MLA weights
    x = mx.random.normal((1, 1, sparse_cfg.hidden_size), key=mx.random.key(2))
    q_latent = sparse.q_a_layernorm(sparse.q_a_proj(x))
    print(json.dumps({"cpu": cpu(), "index_topk": args.topk, "steps": args.steps,
                      "shapes": "DeepSeek-V3.2 attention: 128 heads, kv_lora_rank 512, indexer 64 x 128"}))
    for S in (int(s) for s in args.lengths.split(",")):
        cache, dense_cache = filled(sparse_cfg, S), filled(dense_cfg, S)

        def indexer_alone():  # what the sparse step adds: the new key cached, every position scored, top-k
            cache.update_and_fetch(mx.zeros((1, 1, 1, sparse_cfg.kv_lora_rank)),
                                   mx.zeros((1, 1, 1, sparse_cfg.qk_rope_head_dim)))
            return sparse.indexer(x, q_latent, "causal", cache, cache.offset - 1)

        ms = medians({"sparse": (lambda: sparse(x, "causal", cache, {}), cache),
                      "indexer": (indexer_alone, cache),
                      "dense": (lambda: dense(x, "causal", dense_cache), dense_cache)}, args.steps)
        emit("decode_ms_per_token", ms["sparse"], "ms", context=S, path="sparse (indexer + top-k attention)")
        emit("decode_ms_per_token", ms["indexer"], "ms", context=S, path="indexer scoring and top-k alone")
        emit("decode_ms_per_token", ms["dense"], "ms", context=S, path="dense MLA (every position)")
        emit("dense_over_sparse", ms["dense"] / ms["sparse"], "x", context=S)
        del cache, dense_cache

if __name__ == "__main__":
    main()
