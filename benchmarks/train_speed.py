"""Training tokens/s of dh-mlx's loop against mlx-lm's trainer (full fine-tune), same checkpoint, same batch
shape, in one run. Prints one JSON object per result.

Each engine runs in its own process, two interleaved rounds, best of each. mlx-lm runs as its users run it
(OpenBLAS loaded) and once more with dh-mlx's CPU tuning in its process (the BLAS dh-mlx chooses: MKL when
installed, else OpenBLAS behind the matrix-vector shim, which its sorted gather_mm benefits from; and the
vectorising flags for mx.compile kernels, dh_mlx/backend/cpu/jit.py). Also prints the roofline: model FLOPs
per token x tokens/s against a large float32 matmul's GFLOP/s, and the fraction of it a 3x-mlx-lm loop would need.

    python benchmarks/train_speed.py [--params tiny] [--batch-size 4] [--seq-len 256] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dh_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from dh_mlx import load_preset, random_model, save_model
from dh_mlx import backend
from dh_mlx.backend import cpu_description, untuned_environ
from dh_mlx.backend.cpu import blas
from dh_mlx.params import count_params
from dh_mlx.train.config import TrainConfig
from dh_mlx.train.loss import Batch
from dh_mlx.train.trainer import build_steps, make_optimizer


def batches(vocab: int, B: int, T: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, (B, T + 1)).astype(np.int32) for _ in range(n)]


def ours(path: Path, data: list[np.ndarray], warmup: int) -> float:
    model = dh_mlx.load_model(path)
    model.freeze(keys=["e_score_correction_bias"], strict=False)
    B, T = data[0].shape[0], data[0].shape[1] - 1
    cfg = TrainConfig(steps=len(data), batch_size=B, seq_len=T, lr=1e-4, warmup_steps=0)
    fns = build_steps(model, make_optimizer(cfg), cfg)
    ones, seg, dom = mx.ones((B, T)), mx.zeros((B, T), mx.int32), mx.full((B, T), -1, mx.int32)
    for i, a in enumerate(data):
        if i == warmup:
            tic = time.perf_counter()
        out = fns.step(*Batch(mx.array(a[:, :-1]), mx.array(a[:, 1:]), ones, seg, dom))
        fns.eval(out)
    return (len(data) - warmup) * B * T / (time.perf_counter() - tic)


def mlx_lm(path: Path, data: list[np.ndarray], warmup: int) -> float:
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    B, T = data[0].shape[0], data[0].shape[1] - 1
    dataset = [(row.tolist(), 0) for a in data for row in a]  # (tokens, prompt offset); T+1 tokens each
    stamps: list[float] = []

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            stamps.append(time.perf_counter())

    args = TrainingArgs(batch_size=B, iters=len(data), steps_per_report=1, steps_per_eval=10**9,
                        steps_per_save=10**9, max_seq_length=T + 1,
                        adapter_file=str(Path(tempfile.mkdtemp()) / "adapters.safetensors"))
    train(model, optim.AdamW(learning_rate=1e-4), dataset, None, args, training_callback=Clock())
    return (len(stamps) - warmup) * B * T / (stamps[-1] - stamps[warmup - 1])


ENGINES = {"ours": ours, "mlx_lm": mlx_lm}


def run_engine(engine: str, path: Path, a: argparse.Namespace, tuned: bool = True) -> float:
    env = dict(os.environ) if tuned else untuned_environ()
    args = [sys.executable, __file__, "--engine", engine, "--model", str(path), "--batch-size", str(a.batch_size),
            "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{engine} failed:\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1])


def train_flops_per_token(config, T: int) -> float:
    """6 x matmul parameters a token touches (embedding lookup excluded) + attention scores and values."""
    c = config
    matmul = count_params(c).active - c.vocab_size * c.hidden_size
    attention = 2 * T * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    return 6 * matmul + 3 * attention * c.num_hidden_layers


def matmul_gflops(n: int = 1024) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, 4 * n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n * n * 4 * n / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="tiny")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, help="keep only this many decoder layers (a large preset on 24 GB)")
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # child process: one engine
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    backend.setup(training=True)  # before the first eval (children inherit it): both CPU streams in the step
    if a.engine:
        config = dh_mlx.load_config(a.model)
        data = batches(config.vocab_size, a.batch_size, a.seq_len, a.steps)
        print(ENGINES[a.engine](a.model, data, a.warmup))
        return
    config = load_preset(a.params).replace(num_nextn_predict_layers=0)  # mlx-lm cannot train MTP layers
    if a.layers:
        config = config.replace(num_hidden_layers=a.layers)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d)
        save_model(random_model(config, seed=0), path)
        rounds = [(run_engine("ours", path, a), run_engine("mlx_lm", path, a, tuned=False),
                   run_engine("mlx_lm", path, a)) for _ in range(2)]
    mine, theirs, theirs_tuned = (max(r) for r in zip(*rounds))
    shape = (f"{a.params}{f' ({a.layers} layers)' if a.layers else ''}, batch {a.batch_size} x {a.seq_len}, "
             f"float32, {mx.default_device()}, {cpu_description()}, our BLAS {blas.loaded}")
    print(json.dumps({"name": "train_tokens_per_s", "value": round(mine, 1), "unit": "tokens/s", "setup": shape,
                      "comparison": {"mlx_lm_tokens_per_s": round(theirs, 1), "ratio": round(mine / theirs, 2),
                                     "mlx_lm_with_our_cpu_tuning": round(theirs_tuned, 1),
                                     "ratio_with_tuning": round(mine / theirs_tuned, 2)}}))
    flops, peak = train_flops_per_token(config, a.seq_len), matmul_gflops()
    print(json.dumps({"name": "train_matmul_peak_fraction", "value": round(flops * mine / 1e9 / peak, 3),
                      "unit": "fraction", "setup": shape,
                      "comparison": {"model_gflop_per_token": round(flops / 1e9, 4),
                                     "achieved_gflops": round(flops * mine / 1e9, 1),
                                     "matmul_peak_gflops": round(peak, 1),
                                     "fraction_needed_for_3x_mlx_lm": round(3 * flops * theirs / 1e9 / peak, 2)}}))


if __name__ == "__main__":
    sys.exit(main())
