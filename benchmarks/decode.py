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

    python benchmarks/decode.py --quantized [--prompt-tokens 32] [--gen-tokens 64] [--prefill-tokens 512]

`--quantized`: one random checkpoint (`1b` with 64 experts of width 352, 11 layers, the 8K vocabulary: 820 M
parameters besides the embedding, 131 M active) as float32, bfloat16 and `dh-mlx quantize --bits 4` / `--bits 8`
(group sizes chosen per matrix), against llama.cpp's Q4_K_M and Q8_0 GGUF of it at 1 and 2 threads (its best is
the comparison): decode and 512-token prefill tokens/s, each figure's fraction of the read-bandwidth limit (bytes
of the weights a token reads over the measured bandwidth), QLoRA training tokens/s against float32 LoRA's, and the
peak memory of `generate --bits 4` and of a bfloat16 model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
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
from dh_mlx.config import DATA_DIR
from dh_mlx.train.run import DEFAULT_TOKENIZER

DATA = DATA_DIR / "train_data.jsonl"


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


def ours_formats(path: Path, job: dict) -> tuple[float, float]:
    """(prefill tokens/s of job's long prompt, decode tokens/s after its short one) of a model directory."""
    backend.setup()
    model = dh_mlx.load_model(path, dtype=job.get("dtype"))

    def decode():
        stats = GenerationStats()
        list(generate_tokens(model, job["prompt"], max_tokens=job["n"], mtp=False, stats=stats))
        return 0.0, stats.generation_tps

    def prompt():
        stats = GenerationStats()
        list(generate_tokens(model, job["prefill"], max_tokens=1, mtp=False, stats=stats))
        return stats.prompt_tps, 0.0
    return best_of(prompt)[0], best_of(decode)[1]


def llama_formats(gguf: Path, job: dict) -> tuple[float, float]:
    """(prefill, decode) tokens/s of llama.cpp on a GGUF file at job's thread count (weights read into memory)."""
    import llama_cpp
    t = job["threads"]
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(job["prefill"]) + job["n"] + 8, n_batch=512,
                          verbose=False, n_threads=t, n_threads_batch=t, use_mmap=False)

    def run(tokens, n):
        llm.reset()
        tic = time.perf_counter()
        llm.eval(tokens)
        prompt_tps = len(tokens) / (time.perf_counter() - tic)
        tic = time.perf_counter()
        for _ in range(n):
            llm.eval([llm.sample(temp=0.0)])
        return prompt_tps, n / (time.perf_counter() - tic) if n else 0.0
    return best_of(lambda: run(job["prefill"], 0))[0], best_of(lambda: run(job["prompt"], job["n"]))[1]


def lora_speed(base: Path, job: dict) -> float:
    """Median tokens/s of LoRA training steps (default targets, rank 8) on a float or quantized base."""
    from dh_mlx.train.lora_run import lora
    with tempfile.TemporaryDirectory() as out:
        r = lora(model=base, data=DATA, out=Path(out) / "a", steps=job["steps"], batch_size=4, seq_len=128,
                 eval_every=10**6, save_every=10**6, progress=False, force=True)
    return r.tokens_per_s


ENGINES = {"ours": ours, "ours_mtp": lambda path, prompt, n: ours(path, prompt, n, mtp=True), "mlx_lm": mlx_lm,
           "llama_cpp": llama_cpp}
JOB_ENGINES = {"ours_formats": ours_formats, "llama_formats": llama_formats, "lora_speed": lora_speed}


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
    ap.add_argument("--prompt-tokens", type=int, help="default 512 (with --quantized: 32, then the decode)")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--quantized", action="store_true", help="4/8-bit and bfloat16 against float32 and llama.cpp")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="with --quantized: the prefill prompt")
    ap.add_argument("--train-steps", type=int, default=8, help="with --quantized: LoRA steps per speed run")
    ap.add_argument("--engine", choices=[*ENGINES, *JOB_ENGINES], help=argparse.SUPPRESS)  # child: one engine
    a = ap.parse_args()
    if a.engine in JOB_ENGINES:
        print(json.dumps(JOB_ENGINES[a.engine](a.model, json.loads(sys.stdin.read()))))
        return
    if a.engine:
        print(json.dumps(ENGINES[a.engine](a.model, json.loads(sys.stdin.read()), a.gen_tokens)))
        return
    a.prompt_tokens = a.prompt_tokens or (32 if a.quantized else 512)
    if a.quantized:
        return quantized(a)
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


# ---- --quantized ------------------------------------------------------------------------------------------------
MOE_820M = dict(num_nextn_predict_layers=0, vocab_size=8192, moe_intermediate_size=352, num_hidden_layers=11,
                first_k_dense_replace=0)


def run_job(engine: str, path: Path, job: dict, threads: int | None = None):
    env = dict(os.environ, **({"DH_MLX_THREADS": str(threads)} if threads else {}))
    out = subprocess.run([sys.executable, __file__, "--engine", engine, "--model", str(path)], input=json.dumps(job),
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{engine} {path.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def token_bytes(path: Path, k: int, experts: int, vocab: int) -> int:
    """Bytes of weights one decoded token reads: all but the routed experts (k of `experts`) and the embedding (a
    row); from the safetensors headers of a model directory, or the tensor table of a GGUF file."""
    if path.suffix == ".gguf":
        from gguf import GGUFReader
        sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
        routed = lambda n: "_exps." in n  # noqa: E731
        embedding = lambda n: n.startswith("token_embd")  # noqa: E731
    else:
        from dh_mlx.checkpoint.layout import read_safetensors_header, safetensors_files
        sizes = {n: v["data_offsets"][1] - v["data_offsets"][0] for f in safetensors_files(path)
                 for n, v in read_safetensors_header(f).items() if n != "__metadata__"}
        routed = lambda n: ".mlp.experts." in n  # noqa: E731
        embedding = lambda n: n.startswith("model.embed_tokens.")  # noqa: E731
    return round(sum(b * (k / experts if routed(n) else 1 / vocab if embedding(n) else 1) for n, b in sizes.items()))


def peak_memory(args: list[str]) -> tuple[float, float]:
    """(MLX's peak GB as `generate` reports it, the process's peak resident GB) of a `dh-mlx generate` run."""
    out = subprocess.run(["/usr/bin/time", "-f", "maxrss %M", sys.executable, "-m", "dh_mlx.cli", "generate", *args,
                          "--prompt", "The quick brown fox", "--max-tokens", "16"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"generate {args} failed:\n{out.stderr[-3000:]}")
    mlx_peak = float(re.search(r"peak memory ([0-9.]+) GB", out.stderr)[1])
    return mlx_peak, int(re.search(r"maxrss (\d+)", out.stderr)[1]) * 1024 / 1e9


def quantized(a) -> None:
    from dh_mlx.convert.mlx import quantize
    from dh_mlx.convert.gguf import export_gguf
    config = load_preset(a.params).replace(**MOE_820M)
    rng = np.random.default_rng(0)
    job = {"prompt": rng.integers(3, config.vocab_size, a.prompt_tokens).tolist(), "n": a.gen_tokens,
           "prefill": rng.integers(3, config.vocab_size, a.prefill_tokens).tolist(), "steps": a.train_steps}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model = random_model(config, seed=0)
        for name, dtype in (("f32", None), ("bf16", "bfloat16")):
            save_model(model, root / name, mtp=False, dtype=dtype)
            copy_tokenizer(DEFAULT_TOKENIZER, root / name)
        del model
        gc.collect()
        bpw = {bits: quantize(root / "f32", root / f"q{bits}", bits=bits)["bits_per_weight"] for bits in (4, 8)}
        export_gguf(root / "f32", root / "q4_k_m.gguf", outtype="f32", quantize="Q4_K_M")
        export_gguf(root / "f32", root / "q8_0.gguf", outtype="q8_0")
        ours_runs = {"f32": None, "bf16": "bfloat16", "q4": None, "q8": None}  # our weight kernels: all cores
        one_thread = ("q4", "q8")  # and on one thread (DH_MLX_THREADS=1)
        llama_runs = [(g, t) for g in ("q4_k_m", "q8_0") for t in (1, 2)]
        results: dict = {}
        for _ in range(2):  # two rounds, engines interleaved, best of each: the machine is shared
            for name, dtype in ours_runs.items():
                results.setdefault(name, []).append(run_job("ours_formats", root / name, {**job, "dtype": dtype}))
            for name in one_thread:
                results.setdefault(f"{name}_1", []).append(run_job("ours_formats", root / name, job, threads=1))
            for g, t in llama_runs:
                results.setdefault((g, t), []).append(run_job("llama_formats", root / f"{g}.gguf",
                                                              {**job, "threads": t}))
            for name in ("f32", "q4"):
                results.setdefault(f"lora_{name}", []).append(run_job("lora_speed", root / name, job))
        best = {k: ([max(r[i] for r in v) for i in range(2)] if isinstance(v[0], list) else max(v))
                for k, v in results.items()}
        sizes = {name: token_bytes(root / name, config.num_experts_per_tok, config.n_routed_experts,
                                   config.vocab_size) for name in ours_runs}
        sizes.update({g: token_bytes(root / f"{g}.gguf", config.num_experts_per_tok, config.n_routed_experts,
                                     config.vocab_size) for g in ("q4_k_m", "q8_0")})
        memory = {"generate --bits 4 (float32 checkpoint)": peak_memory(["--model", str(root / "f32"), "--bits", "4"]),
                  "bfloat16 checkpoint, --dtype bfloat16": peak_memory(["--model", str(root / "bf16"), "--dtype",
                                                                        "bfloat16"]),
                  "float32 checkpoint": peak_memory(["--model", str(root / "f32")])}
    bw = read_bandwidth()
    setup = (f"{a.params} x {MOE_820M}, prompt {a.prompt_tokens} + {a.gen_tokens} new, prefill {a.prefill_tokens}, "
             f"{cpu_description()}, our BLAS {blas.loaded}, read bandwidth {bw / 1e9:.1f} GB/s")
    frac = lambda name, tps: round(tps * sizes[name] / bw, 3)  # noqa: E731

    def llama(g, i):  # llama.cpp at its best thread count
        t = max((1, 2), key=lambda t: best[(g, t)][i])
        return best[(g, t)][i], t

    for what, name, g, i in (("decode_4bit", "q4", "q4_k_m", 1), ("decode_8bit", "q8", "q8_0", 1),
                             ("prefill_4bit", "q4", "q4_k_m", 0)):
        lv, lt = llama(g, i)
        emit(what, best[name][i], "tokens/s", setup=setup, llama_cpp=round(lv, 2), llama_cpp_threads=lt,
             ratio_llama_cpp=round(best[name][i] / lv, 2), float32=round(best["f32"][i], 2),
             ratio_float32=round(best[name][i] / best["f32"][i], 2), bits_per_weight=round(bpw[int(name[1])], 2),
             bandwidth_fraction=frac(name, best[name][i]) if i else None,
             llama_cpp_bandwidth_fraction=frac(g, lv) if i else None, bytes_per_token=sizes[name],
             llama_cpp_bytes_per_token=sizes[g], llama_cpp_all=[[t, *best[(g, t)]] for t in (1, 2)],
             ours_one_thread=round(best[f"{name}_1"][i], 2))
    for name in ("bf16", "f32"):
        emit(f"decode_{name}", best[name][1], "tokens/s", setup=setup, ratio_float32=round(best[name][1] /
             best["f32"][1], 2), prefill=round(best[name][0], 1), bandwidth_fraction=frac(name, best[name][1]),
             bytes_per_token=sizes[name])
    emit("qlora_4bit_training", best["lora_q4"], "tokens/s", setup=setup, lora_float32=round(best["lora_f32"], 1),
         ratio_lora_float32=round(best["lora_q4"] / best["lora_f32"], 2))
    for what, (mlx_peak, rss) in memory.items():
        emit("peak_memory", round(mlx_peak, 3), "GB", setup=setup, run=what, peak_resident_GB=round(rss, 3))


if __name__ == "__main__":
    main()
