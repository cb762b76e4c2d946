"""Shown to learn: train `tiny` on the bundled corpus with ALF on and off (same seed, same budget).

Prints one JSON object per result: validation loss before/after against the unigram-entropy baseline,
with and without domain ids, tokens/s, and the expert-load imbalance (max/mean over a validation pass of
plain, domain-free routing) with ALF on and off.

    python benchmarks/train_tiny.py [--steps 150] [--batch-size 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import dh_mlx  # noqa: F401
from dh_mlx import load_preset, random_model
from dh_mlx import backend
from dh_mlx.tokenizer import load_tokenizer
from dh_mlx.train.config import TrainConfig
from dh_mlx.train.data import load_dataset, unigram_entropy
from dh_mlx.train.run import DEFAULT_DATA, DEFAULT_TOKENIZER, train
from dh_mlx.train.trainer import evaluate


def emit(name, value, unit, **comparison):
    print(json.dumps({"name": name, "value": round(value, 4) if isinstance(value, float) else value, "unit": unit,
                      "comparison": comparison}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    backend.setup(training=True)  # before the first eval: both CPU streams in the step
    config = load_preset("tiny")
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed, eval_batches=40)
    tok = load_tokenizer(DEFAULT_TOKENIZER)
    data = load_dataset(DEFAULT_DATA, tok, seq_len=a.seq_len, domains=config.domain_routing.domains, seed=a.seed)
    baseline = unigram_entropy(data.valid)
    before = evaluate(random_model(config, seed=a.seed), data, cfg).loss
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for label, gamma in (("alf_on", 1e-3), ("alf_off", 0.0)):
            run = train(params="tiny", out=Path(d) / label, steps=a.steps, batch_size=a.batch_size,
                        seq_len=a.seq_len, seed=a.seed, alf_gamma=gamma, eval_every=a.steps, save_every=a.steps,
                        eval_batches=40, progress=False)
            model = dh_mlx.load_model(Path(d) / label)
            results[label] = (run, evaluate(model, data, cfg), evaluate(model, data, cfg, use_domains=False))
    run, with_dom, plain = results["alf_on"]
    emit("tiny_val_loss_after", with_dom.loss, "nats/token", before=before, unigram_entropy=baseline,
         steps=a.steps, tokens=a.steps * a.batch_size * a.seq_len)
    emit("tiny_val_loss_without_domain_ids", plain.loss, "nats/token", with_domain_ids=with_dom.loss)
    emit("tiny_train_tokens_per_s", run.tokens_per_s, "tokens/s", peak_memory_gb=run.peak_memory_gb)
    off = results["alf_off"]
    emit("expert_load_imbalance_alf_on", plain.imbalance, "max/mean load", alf_off=off[2].imbalance,
         val_loss_alf_off=off[1].loss)


if __name__ == "__main__":
    main()
