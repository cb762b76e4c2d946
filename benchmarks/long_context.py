"""Long context: latent-cache memory and decode speed at 4K, 32K and 128K tokens, beside the KV cache that
Llama-3.2-3B and Phi-3-mini shapes would need.

The cache is filled with random latents of the given length (decode cost depends only on the length, and
prefilling 128K tokens on a 2-core CPU would take many minutes); a real chunked prefill of the first 4K tokens
is timed too. Prints one JSON object per result.

    python benchmarks/long_context.py [--params tiny] [--lengths 4096,32768,131072]
"""

from __future__ import annotations

import argparse
import json
import time

import dh_mlx  # noqa: F401
from dh_mlx import backend
import mlx.core as mx

from dh_mlx import load_preset, random_model
from dh_mlx.generation.cache import make_cache
from dh_mlx.generation import compiled_decode_step, decode_step, prefill
from dh_mlx.params import KV_REFERENCES, reference_kv_bytes_per_token


def emit(name, value, unit, **comparison):
    print(json.dumps({"name": name, "value": round(value, 3) if isinstance(value, float) else value, "unit": unit,
                      "comparison": comparison}), flush=True)


def filled_cache(model, length: int):
    c = model.config
    cache = make_cache(c)
    key = mx.random.key(0)
    for layer_cache in cache:
        latent = mx.random.normal((1, 1, length, c.kv_lora_rank), key=key)
        k_pe = mx.random.normal((1, 1, length, c.qk_rope_head_dim), key=key)
        layer_cache.update_and_fetch(latent, k_pe)
    mx.eval([x.latent for x in cache] + [x.k_pe for x in cache])
    return cache


def decode_speed(step, token, cache, n: int) -> float:
    """Tokens/s of `n` decode steps after one warm-up; the cache is trimmed back to its length afterwards."""
    mx.eval(step(token, cache)[0])
    tic = time.perf_counter()
    for _ in range(n):
        mx.eval(step(token, cache)[0])
    tps = n / (time.perf_counter() - tic)
    for c in cache:
        c.trim(n + 1)
    return tps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="tiny")
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--decode-tokens", type=int, default=16)
    a = ap.parse_args()
    backend.setup()  # the CPU operations dh_mlx.load would set up
    config = load_preset(a.params)
    model = random_model(config, seed=0)
    dtype_bytes = 4  # float32 on the CPU backend
    token = mx.array([[5]])
    prompt = mx.random.randint(3, config.vocab_size, (1, 4096))
    mx.eval(prefill(model, prompt[:, :1024], make_cache(config), step_size=512))  # warm up both paths
    cache = make_cache(config)
    tic = time.perf_counter()
    logits, _ = prefill(model, prompt, cache, step_size=512)
    mx.eval(logits)
    emit("prefill_4k_tokens_per_s", 4096 / (time.perf_counter() - tic), "tokens/s", params=a.params,
         chunk=512)
    for length in (int(x) for x in a.lengths.split(",")):
        if length > config.max_position_embeddings:
            continue
        cache = filled_cache(model, length)
        nbytes = sum(c.nbytes for c in cache)
        eager = lambda tok, cache: decode_step(model, tok, cache)  # noqa: E731
        tps = {name: decode_speed(step, token, cache, a.decode_tokens)
               for name, step in (("eager", eager), ("compiled", compiled_decode_step(model)))}
        refs = {name: reference_kv_bytes_per_token(name, dtype_bytes) * length for name in KV_REFERENCES}
        emit(f"kv_cache_bytes_{length}", nbytes, "bytes", params=a.params, dtype="float32",
             per_token=nbytes // length,
             formula=config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype_bytes,
             **{f"{k}_bytes": v for k, v in refs.items()})
        emit(f"decode_tokens_per_s_{length}", tps["compiled"], "tokens/s", params=a.params,
             eager_decode_step=round(tps["eager"], 3), ratio=round(tps["compiled"] / tps["eager"], 2))
        del cache


if __name__ == "__main__":
    main()
