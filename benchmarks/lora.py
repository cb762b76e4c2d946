"""LoRA on a held-out domain: a base trained by `dh-mlx train` without that domain, then LoRA, QLoRA (4-bit
base) and full fine-tuning on it, and our LoRA tokens/s against mlx-lm's trainer with its LoRA layers on the
same MTP-free base, keys, rank, rows and batch shape. One JSON object per result.

    python benchmarks/lora.py [--base DIR] [--domain legal] [--steps 100] [--base-steps 150]

Without --base, trains one on data/train_data.jsonl minus the domain (--base-steps, ~5 minutes on 2 cores).
Validation loss is on the domain's held-out documents (the same split for every run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import dh_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from dh_mlx import load_model, save_model
from dh_mlx.config import DATA_DIR
from dh_mlx import backend
from dh_mlx.convert.mlx import quantize
from dh_mlx.tokenizer import load_tokenizer
from dh_mlx.train.data import load_dataset
from dh_mlx.train.lora_run import lora
from dh_mlx.checkpoint.weights import copy_tokenizer
from dh_mlx.train.run import train


def split_corpus(src: Path, domain: str, work: Path) -> tuple[Path, Path]:
    rest, held = work / "base.jsonl", work / f"{domain}.jsonl"
    with src.open() as f, rest.open("w") as r, held.open("w") as h:
        for line in f:
            if line.strip():
                (h if json.loads(line).get("domain") == domain else r).write(line)
    return rest, held


def fresh() -> None:
    gc.collect()
    mx.clear_cache()


def median_tps(history: list[dict]) -> float:
    return float(np.median([r["tokens_per_s"] for r in history[1:]]))


def mlx_lm_tokens_per_s(base: Path, adapter_config: dict, rows: np.ndarray, B: int, steps: int, lr: float
                        ) -> tuple[float, float]:
    """(tokens/s, peak GB) of mlx-lm's LoRA trainer on `rows` ((n, T+1) token rows), first 2 steps left out."""
    import tempfile
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train as mlx_lm_train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_lm_load
    model, _ = mlx_lm_load(base)
    model.freeze()
    linear_to_lora_layers(model, adapter_config["num_layers"], adapter_config["lora_parameters"])
    T = rows.shape[1] - 1
    stamps: list[float] = []

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            stamps.append(time.perf_counter())

    args = TrainingArgs(batch_size=B, iters=steps, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
                        max_seq_length=T + 1, adapter_file=str(Path(tempfile.mkdtemp()) / "adapters.safetensors"))
    mx.reset_peak_memory()
    with contextlib.redirect_stdout(sys.stderr):  # its progress table; stdout carries our JSON lines only
        mlx_lm_train(model, optim.AdamW(learning_rate=lr), [(r.tolist(), 0) for r in rows], None, args,
                     training_callback=Clock())
    dt = np.diff(stamps)[2:]
    return float(B * T / np.median(dt)), mx.get_peak_memory() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, help="a model trained by dh-mlx train without --domain's data")
    ap.add_argument("--data", type=Path, default=DATA_DIR / "train_data.jsonl")
    ap.add_argument("--domain", default="legal")
    ap.add_argument("--work", type=Path, default=Path("runs/lora_bench"))
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate (best of 1e-3, 3e-3 here)")
    ap.add_argument("--full-lr", type=float, default=3e-4, help="full fine-tuning learning rate")
    ap.add_argument("--speed-steps", type=int, default=20, help="steps of each side-by-side speed run")
    ap.add_argument("--rounds", type=int, default=2, help="side-by-side speed runs of each trainer")
    a = ap.parse_args()
    backend.setup(training=True)  # before the first eval (children inherit it): both CPU streams in the step
    work = a.work
    for name in ("lora", "qlora_4bit", "full", "lora_speed_0"):
        if (work / name).exists():
            raise SystemExit(f"{work / name} holds an earlier run; remove it or pass another --work")
    work.mkdir(parents=True, exist_ok=True)
    rest, held = split_corpus(a.data, a.domain, work)
    if a.base is None:
        a.base = work / "base"
        if not (a.base / "config.json").is_file():
            train(out=a.base, data=rest, steps=a.base_steps, progress=False)
    plain = work / "base_plain"  # MTP-free: what mlx-lm can load, and what LoRA needs (no MTP loss)
    save_model(load_model(a.base), plain, mtp=False)
    copy_tokenizer(a.base, plain)
    quantize(plain, work / "base_q4", bits=4, group_size=64)
    B, T, steps = a.batch_size, a.seq_len, a.steps
    setup = (f"base {a.base} (trained without '{a.domain}'), fine-tuned on '{a.domain}', {steps} steps, "
             f"batch {B} x {T}, {mx.default_device()}")
    common = dict(data=held, steps=steps, batch_size=B, seq_len=T, eval_every=steps, save_every=steps,
                  progress=False)

    def emit(name, value, unit, **comparison):
        print(json.dumps({"name": name, "value": value, "unit": unit, "setup": setup, "comparison": comparison}),
              flush=True)

    runs = {}
    for name, model in (("lora", plain), ("qlora_4bit", work / "base_q4")):
        fresh()
        runs[name] = r = lora(model=model, out=work / name, lr=a.lr, **common)
        emit(f"{name}_val_loss", round(r.val_loss, 4), "nats/token", before=round(r.val_loss_before, 4),
             train_loss=round(r.run.train_loss, 4))
        emit(f"{name}_trainable_share", round(r.share, 5), "fraction", trainable=r.trainable, total=r.total)
        emit(f"{name}_peak_memory", round(r.run.peak_memory_gb, 3), "GB",
             estimated=round(r.estimated_peak_gb, 3))
        emit(f"{name}_tokens_per_s", round(r.tokens_per_s, 1), "tokens/s")
    fresh()
    full = train(init=plain, tokenizer=plain, out=work / "full", lr=a.full_lr, warmup_steps=10, **common)
    emit("full_finetune_val_loss", round(full.val.loss, 4), "nats/token", lora=round(runs["lora"].val_loss, 4))
    emit("full_finetune_peak_memory", round(full.peak_memory_gb, 3), "GB",
         lora=round(runs["lora"].run.peak_memory_gb, 3), qlora_4bit=round(runs["qlora_4bit"].run.peak_memory_gb, 3),
         lora_ratio=round(runs["lora"].run.peak_memory_gb / full.peak_memory_gb, 3))
    emit("full_finetune_tokens_per_s", round(median_tps(full.history), 1), "tokens/s")

    # Side by side: mlx-lm's LoRA trainer and ours, same base, keys, rank, rows, batch shape, steps; alternated
    # `--rounds` times and the best of each kept, so a burst of load on a shared machine hits both alike.
    adapter_config = json.loads((work / "lora" / "adapter_config.json").read_text())
    dr = load_model(plain).config.domain_routing
    ds = load_dataset(held, load_tokenizer(plain), seq_len=T, domains=dr.domains if dr else None)
    n = min(len(ds.train), B * a.speed_steps)
    b = ds.train.batch(np.arange(n))
    rows = np.concatenate([b.inputs, b.targets[:, -1:]], axis=1)  # (n, T+1): the rows our loop trains on
    theirs, ours = [], []
    for i in range(a.rounds):
        fresh()
        theirs.append(mlx_lm_tokens_per_s(plain, adapter_config, rows, B, a.speed_steps, a.lr))
        fresh()
        r = lora(model=plain, out=work / f"lora_speed_{i}", lr=a.lr,
                 **{**common, "steps": a.speed_steps, "eval_every": 10**6, "save_every": 10**6})
        ours.append((float(np.median([h["tokens_per_s"] for h in r.run.history[2:]])), r.run.peak_memory_gb))
    (t_tps, t_peak), (o_tps, o_peak) = max(theirs), max(ours)
    emit("lora_tokens_per_s_vs_mlx_lm", round(o_tps, 1), "tokens/s", mlx_lm=round(t_tps, 1),
         ratio=round(o_tps / t_tps, 2), rounds=[[round(o[0], 1), round(t[0], 1)] for o, t in zip(ours, theirs)],
         ours_peak_GB=round(o_peak, 3), mlx_lm_peak_GB=round(t_peak, 3),
         keys=adapter_config["lora_parameters"]["keys"])


if __name__ == "__main__":
    sys.exit(main())
