"""Prompt (prefill) and decode tokens/s: dh-mlx against mlx-lm's stream_generate on the same checkpoint, in
one run (and llama.cpp on the same weights as an F32 GGUF when llama-cpp-python and our exporter are present).

float32 on the CPU backend; on Metal the script uses bfloat16. Also prints decode's fraction of the
memory-bandwidth limit: active weight bytes per token x tokens/s over a measured copy bandwidth.

    python benchmarks/decode.py [--params 1b] [--prompt-tokens 512] [--gen-tokens 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import dh_mlx  # noqa: F401  (fast BLAS first)
import mlx.core as mx
import numpy as np

from dh_mlx import load_preset, random_model, save_model
from dh_mlx.generate import GenerationStats, generate_tokens
from dh_mlx.device import compute_dtype
from dh_mlx.params import count_params
from dh_mlx.train.run import DEFAULT_TOKENIZER, copy_tokenizer


def emit(name, value, unit, **comparison):
    print(json.dumps({"name": name, "value": round(value, 2), "unit": unit, "comparison": comparison}), flush=True)


def copy_bandwidth() -> float:
    """Bytes/s of a large float32 copy (read + write), numpy, best of 5."""
    a = np.ones(64 * 2**20, np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b = a.copy()
        best = min(best, time.perf_counter() - t)
    del b
    return 2 * a.nbytes / best


def ours(path: Path, prompt: list[int], n: int, mtp: bool = False) -> GenerationStats:
    model = dh_mlx.load_model(path)
    list(generate_tokens(model, prompt[:32], max_tokens=4, mtp=mtp))  # warm up
    stats = GenerationStats()
    list(generate_tokens(model, prompt, max_tokens=n, mtp=mtp, stats=stats))
    return stats


def mlx_lm(path: Path, prompt: list[int], n: int) -> tuple[float, float]:
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model
    model, _ = load_model(path)
    for _ in zip(range(4), generate_step(mx.array(prompt[:32]), model)):
        pass
    tic = time.perf_counter()
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    next(steps)  # the first token is out once the prompt is processed
    prompt_tps = len(prompt) / (time.perf_counter() - tic)
    tic = time.perf_counter()
    k = 1 + sum(1 for _ in steps)
    return prompt_tps, (k - 1) / (time.perf_counter() - tic)


def llama_cpp(path: Path, prompt: list[int], n: int) -> tuple[float, float] | None:
    try:
        import llama_cpp
        from dh_mlx.convert.gguf import export_gguf
    except ImportError:
        return None
    gguf = path / "model-f32.gguf"
    export_gguf(path, gguf, outtype="f32")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(prompt) + n + 8, n_batch=512, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(prompt[:32])
    llm.reset()
    tic = time.perf_counter()
    llm.eval(prompt)
    prompt_tps = len(prompt) / (time.perf_counter() - tic)
    tic = time.perf_counter()
    for _ in range(n):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    return prompt_tps, n / (time.perf_counter() - tic)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="1b")
    ap.add_argument("--model", type=Path, help="an existing model directory instead of a random preset")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d)
        if a.model:
            config = dh_mlx.load_config(a.model)
            model = dh_mlx.load_model(a.model)
        else:
            # mlx-lm refuses MTP layers; the vocabulary is the bundled tokenizer's, which the GGUF needs
            config = load_preset(a.params).replace(num_nextn_predict_layers=0, vocab_size=8192)
            model = random_model(config, seed=0)
        save_model(model, path, mtp=False)
        copy_tokenizer(a.model or DEFAULT_TOKENIZER, path)
        del model
        gc.collect()
        prompt = np.random.default_rng(0).integers(3, config.vocab_size, a.prompt_tokens).tolist()
        mine = ours(path, prompt, a.gen_tokens)
        gc.collect()
        theirs = mlx_lm(path, prompt, a.gen_tokens)
        gc.collect()
        lcpp = llama_cpp(path, prompt, a.gen_tokens)
    dtype = str(compute_dtype()).rsplit(".", 1)[-1]  # float32 on the CPU backend, bfloat16 on Metal
    setup = f"{a.model or a.params}, {dtype}, {mx.default_device()}, prompt {a.prompt_tokens}, {a.gen_tokens} new"
    extra = {} if lcpp is None else {"llama_cpp": round(lcpp[1], 2), "ratio_llama_cpp": round(mine.generation_tps / lcpp[1], 2)}
    emit("decode_tokens_per_s", mine.generation_tps, "tokens/s", setup=setup, mlx_lm=round(theirs[1], 2),
         ratio_mlx_lm=round(mine.generation_tps / theirs[1], 2), **extra)
    extra = {} if lcpp is None else {"llama_cpp": round(lcpp[0], 2), "ratio_llama_cpp": round(mine.prompt_tps / lcpp[0], 2)}
    emit("prefill_tokens_per_s", mine.prompt_tps, "tokens/s", setup=setup, mlx_lm=round(theirs[0], 2),
         ratio_mlx_lm=round(mine.prompt_tps / theirs[0], 2), **extra)
    active_bytes = count_params(config).active * compute_dtype().size
    bw = copy_bandwidth()
    emit("decode_bandwidth_fraction", active_bytes * mine.generation_tps / bw, "fraction",
         active_weight_bytes_per_token=active_bytes, copy_bandwidth_gb_s=round(bw / 1e9, 1))


if __name__ == "__main__":
    main()
