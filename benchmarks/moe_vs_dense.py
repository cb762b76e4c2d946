"""The seed's "~3x faster" claim: decode tokens/s of the MoE preset against a dense Llama-style model with the
same total parameter count, same framework (MLX), same dtype, in one run.

The dense model is mlx-lm's Llama with random weights (hidden 2048, 19 layers, GQA 16/8 heads, SwiGLU 5504,
the same vocabulary), ~1.0 B parameters, every one of them active. `5b` against a Llama-3.2-3B shape needs
~21 GB in float32 and is skipped on this 24 GB machine (bf16 on the CPU backend is ~50x slower).

    python benchmarks/moe_vs_dense.py [--params 1b] [--gen-tokens 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import dh_mlx  # noqa: F401
from dh_mlx import backend
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from dh_mlx import load_preset, random_model
from dh_mlx.generation import GenerationStats, generate_tokens
from dh_mlx.params import count_params

DENSE = dict(model_type="llama", hidden_size=2048, num_hidden_layers=19, intermediate_size=5504,
             num_attention_heads=16, num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0,
             tie_word_embeddings=False)


def dense_decode(vocab: int, prompt: list[int], n: int) -> tuple[float, int]:
    from mlx_lm.generate import generate_step
    from mlx_lm.models.llama import Model, ModelArgs
    model = Model(ModelArgs(vocab_size=vocab, **DENSE))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _ in zip(range(3), generate_step(mx.array(prompt), model)):
        pass
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    next(steps)
    tic = time.perf_counter()
    k = sum(1 for _ in steps)
    return k / (time.perf_counter() - tic), n_params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="1b")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    a = ap.parse_args()
    backend.setup()  # the CPU operations dh_mlx.load would set up
    config = load_preset(a.params).replace(num_nextn_predict_layers=0)
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, a.prompt_tokens).tolist()
    model = random_model(config, seed=0)
    list(generate_tokens(model, prompt, max_tokens=3))
    stats = GenerationStats()
    list(generate_tokens(model, prompt, max_tokens=a.gen_tokens, stats=stats))
    del model
    gc.collect()
    dense_tps, dense_params = dense_decode(config.vocab_size, prompt, a.gen_tokens)
    p = count_params(config)
    print(json.dumps({"name": f"moe_{a.params}_decode_tokens_per_s", "value": round(stats.generation_tps, 2),
                      "unit": "tokens/s", "comparison": {
                          "dense_llama_tokens_per_s": round(dense_tps, 2),
                          "speedup": round(stats.generation_tps / dense_tps, 2),
                          "moe_total_params": p.total, "moe_active_params": p.active,
                          "dense_params": dense_params, "dtype": "float32", "device": str(mx.default_device())}}))


if __name__ == "__main__":
    main()
