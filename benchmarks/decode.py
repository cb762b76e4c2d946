"""Prompt (prefill) and decode tokens/s: dh-mlx against mlx-lm's generate_step on the same checkpoint, in
one run (and llama.cpp on the same weights as an F32 GGUF when llama-cpp-python and our exporter are present).

Each engine runs in its own process. mlx-lm runs as its users run it (OpenBLAS loaded, as in the brief's
figures) and, for transparency, once more with dh-mlx's CPU tuning in its process: the BLAS dh-mlx chooses
(MKL when the `mkl` wheel is installed, else OpenBLAS behind the matrix-vector shim dh_mlx/backend/cpu/blas_shim.c) and
the vectorising compiler flags for mx.compile kernels (dh_mlx/backend/cpu/jit.py), which speed up any MLX program.
float32 on the CPU backend; on Metal the script uses bfloat16. Also prints decode's fraction of the
memory-bandwidth limit: active weight bytes per token x tokens/s over the read bandwidth a tuned BLAS reaches
(numpy's float32 GEMV over a 1 GiB matrix).

    python benchmarks/decode.py [--params 1b] [--prompt-tokens 512] [--gen-tokens 64] [--model DIR]

With `--model` a directory whose model has MTP modules, ours also decodes with `--mtp` (greedy speculation,
adaptive policy) on the same main weights, against plain decoding and llama.cpp.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dh_mlx  # noqa: F401  (fast BLAS first)
import mlx.core as mx
import numpy as np

from dh_mlx import load_preset, random_model, save_model
from dh_mlx.generation import GenerationStats, generate_tokens
from dh_mlx import backend
from dh_mlx.backend import cpu_description, untuned_environ
from dh_mlx.backend.cpu import blas
from dh_mlx.device import compute_dtype
from dh_mlx.params import count_params
from dh_mlx.checkpoint.weights import copy_tokenizer
from dh_mlx.train.run import DEFAULT_TOKENIZER


def emit(name, value, unit, **comparison):
    print(json.dumps({"name": name, "value": round(value, 2), "unit": unit, "comparison": comparison}), flush=True)


def read_bandwidth() -> float:
    """Bytes/s a tuned multi-threaded BLAS reads weights at: numpy float32 GEMV over 1 GiB, best of 3."""
    w = np.ones((2**18, 1024), np.float32)
    x = np.ones(1024, np.float32)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        w @ x
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best


REPEATS = 2  # per process: one full warm-up run (every weight touched), then the best of REPEATS timed runs


def best_of(run) -> tuple[float, float]:
    """run() -> (prompt tokens/s, decode tokens/s); the first call warms up, the rest are timed."""
    run()
    results = [run() for _ in range(REPEATS)]
    return max(r[0] for r in results), max(r[1] for r in results)


def ours(path: Path, prompt: list[int], n: int, mtp: bool = False) -> tuple[float, ...]:
    backend.setup()
    model = dh_mlx.load_model(path)
    acceptance = []

    def run():
        stats = GenerationStats()
        list(generate_tokens(model, prompt, max_tokens=n, mtp=mtp, stats=stats))
        acceptance.append(stats.acceptance_rate)
        return stats.prompt_tps, stats.generation_tps
    return (*best_of(run), acceptance[-1]) if mtp else best_of(run)


def mlx_lm(path: Path, prompt: list[int], n: int) -> tuple[float, float]:
    from dh_mlx.backend.cpu import jit
    jit.enable()  # our compiler flags in the tuned run (a no-op under untuned_environ's DH_MLX_JIT=off)
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model
    model, _ = load_model(path)

    def run():
        tic = time.perf_counter()
        steps = generate_step(mx.array(prompt), model, max_tokens=n)
        next(steps)  # the first token is out once the prompt is processed
        prompt_tps = len(prompt) / (time.perf_counter() - tic)
        tic = time.perf_counter()
        k = 1 + sum(1 for _ in steps)
        return prompt_tps, (k - 1) / (time.perf_counter() - tic)
    return best_of(run)


def llama_cpp(path: Path, prompt: list[int], n: int) -> tuple[float, float] | None:
    try:
        import llama_cpp
        from dh_mlx.convert.gguf import export_gguf
    except ImportError:
        return None
    gguf = path / "model-f32.gguf"
    export_gguf(path, gguf, outtype="f32")
    # every core (llama-cpp-python's default is half of them); weights read into memory, not paged in from disk
    threads = os.cpu_count()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(prompt) + n + 8, n_batch=512, verbose=False,
                          type_k=0, type_v=0, n_threads=threads, n_threads_batch=threads, use_mmap=False)

    def run():
        llm.reset()
        tic = time.perf_counter()
        llm.eval(prompt)
        prompt_tps = len(prompt) / (time.perf_counter() - tic)
        tic = time.perf_counter()
        for _ in range(n):
            llm.eval([llm.sample(temp=0.0)])
        return prompt_tps, n / (time.perf_counter() - tic)
    return best_of(run)


ENGINES = {"ours": ours, "ours_mtp": lambda path, prompt, n: ours(path, prompt, n, mtp=True), "mlx_lm": mlx_lm,
           "llama_cpp": llama_cpp}


def run_engine(engine: str, path: Path, prompt: list[int], n: int, tuned: bool = True) -> tuple[float, float] | None:
    """(prompt tokens/s, decode tokens/s) of one engine, measured in a fresh process."""
    env = dict(os.environ) if tuned else untuned_environ()
    args = [sys.executable, __file__, "--engine", engine, "--model", str(path), "--gen-tokens", str(n)]
    out = subprocess.run(args, input=json.dumps(prompt), capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{engine} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="1b")
    ap.add_argument("--model", type=Path, help="an existing model directory instead of a random preset")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # child process: one engine
    a = ap.parse_args()
    if a.engine:
        print(json.dumps(ENGINES[a.engine](a.model, json.loads(sys.stdin.read()), a.gen_tokens)))
        return
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as d_mtp:
        path, path_mtp = Path(d), Path(d_mtp)
        if a.model:
            config = dh_mlx.load_config(a.model)
            model = dh_mlx.load_model(a.model)
        else:
            # mlx-lm refuses MTP layers; the vocabulary is the bundled tokenizer's, which the GGUF needs
            config = load_preset(a.params).replace(num_nextn_predict_layers=0, vocab_size=8192)
            model = random_model(config, seed=0)
        save_model(model, path, mtp=False)
        copy_tokenizer(a.model or DEFAULT_TOKENIZER, path)
        has_mtp = bool(model.config.num_nextn_predict_layers)  # then also ours with --mtp (its own copy)
        if has_mtp:
            save_model(model, path_mtp)
        del model
        gc.collect()
        prompt = np.random.default_rng(0).integers(3, config.vocab_size, a.prompt_tokens).tolist()
        # Two rounds, engines interleaved, best of each: this machine is shared and its speed drifts.
        rounds = [[run_engine("ours", path, prompt, a.gen_tokens),
                   run_engine("mlx_lm", path, prompt, a.gen_tokens, tuned=False),
                   run_engine("mlx_lm", path, prompt, a.gen_tokens),
                   run_engine("llama_cpp", path, prompt, a.gen_tokens),
                   run_engine("ours_mtp", path_mtp, prompt, a.gen_tokens) if has_mtp else None]
                  for _ in range(2)]
        mine, theirs, theirs_tuned, lcpp, mine_mtp = (
            None if r[0] is None else (max(x[0] for x in r), max(x[1] for x in r), *r[-1][2:]) for r in zip(*rounds))
    dtype = str(compute_dtype()).rsplit(".", 1)[-1]  # float32 on the CPU backend, bfloat16 on Metal
    setup = (f"{a.model or a.params}, {dtype}, {mx.default_device()}, prompt {a.prompt_tokens}, {a.gen_tokens} new, "
             f"{cpu_description()}, our BLAS {blas.loaded}")
    for i, name in ((1, "decode_tokens_per_s"), (0, "prefill_tokens_per_s")):
        extra = {} if lcpp is None else {"llama_cpp": round(lcpp[i], 2), "ratio_llama_cpp": round(mine[i] / lcpp[i], 2)}
        emit(name, mine[i], "tokens/s", setup=setup, mlx_lm=round(theirs[i], 2),
             ratio_mlx_lm=round(mine[i] / theirs[i], 2), mlx_lm_with_our_cpu_tuning=round(theirs_tuned[i], 2),
             ratio_mlx_lm_with_our_cpu_tuning=round(mine[i] / theirs_tuned[i], 2), **extra)
    if mine_mtp is not None:  # greedy MTP self-speculative decoding (adaptive policy) on the same main weights
        extra = {} if lcpp is None else {"llama_cpp": round(lcpp[1], 2),
                                         "ratio_llama_cpp": round(mine_mtp[1] / lcpp[1], 2)}
        emit("decode_tokens_per_s_mtp", mine_mtp[1], "tokens/s", setup=setup, plain=round(mine[1], 2),
             ratio_plain=round(mine_mtp[1] / mine[1], 2), acceptance=mine_mtp[2], **extra)
    active_bytes = count_params(config).active * compute_dtype().size
    bw = read_bandwidth()
    emit("decode_bandwidth_fraction", active_bytes * mine[1] / bw, "fraction",
         active_weight_bytes_per_token=active_bytes, read_bandwidth_gb_s=round(bw / 1e9, 1),
         llama_cpp=None if lcpp is None else round(active_bytes * lcpp[1] / bw, 2))


if __name__ == "__main__":
    main()
