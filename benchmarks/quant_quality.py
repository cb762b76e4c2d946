"""Quantization quality on a trained model: size on disk, validation perplexity, and the mean KL divergence of
next-token distributions from the float model's, for 8-bit, 4-bit and the mixed recipe. One JSON object per
result.

    python benchmarks/quant_quality.py --model runs/tiny [--data data/train_data.jsonl] [--batches 16]

Without --model, trains one first (`dh-mlx train --steps 150`, about 5 minutes on 2 cores). The validation
documents are the training run's own held-out split (same data, seq_len, seed and val_fraction).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import dh_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
from dh_mlx import backend
import mlx.core as mx
import mlx.nn as nn

from dh_mlx import load_model
from dh_mlx.config import DATA_DIR
from dh_mlx.convert.mlx import dir_bytes, quantize
from dh_mlx.tokenizer import load_tokenizer
from dh_mlx.train.data import load_dataset
from dh_mlx.train.loss import document_mask
from dh_mlx.train.trainer import to_mx

VARIANTS = [("q8", 8, "uniform"), ("q8_mixed", 8, "mixed"), ("q4", 4, "uniform"), ("q4_mixed", 4, "mixed")]


def scores(model, ref, batches) -> tuple[float, float]:
    """(validation perplexity of `model`, mean KL(ref || model) per trained token) over `batches`."""
    nll = kl = n = 0.0
    for b in batches:
        mask = document_mask(b.segment_ids)
        lq = nn.log_softmax(model(b.inputs, domain_ids=b.domain_ids, mask=mask).astype(mx.float32), axis=-1)
        lp = nn.log_softmax(ref(b.inputs, domain_ids=b.domain_ids, mask=mask).astype(mx.float32), axis=-1)
        token_nll = -mx.take_along_axis(lq, b.targets[..., None], axis=-1)[..., 0]  # (B, T)
        token_kl = (mx.exp(lp) * (lp - lq)).sum(axis=-1)  # (B, T)
        nll += (token_nll * b.loss_mask).sum().item()
        kl += (token_kl * b.loss_mask).sum().item()
        n += b.loss_mask.sum().item()
    return math.exp(nll / n), kl / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="model directory trained by dh-mlx train")
    ap.add_argument("--data", type=Path, default=DATA_DIR / "train_data.jsonl", help="the data it was trained on")
    ap.add_argument("--batches", type=int, default=16, help="validation batches of 8 sequences")
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()
    backend.setup()  # the CPU operations dh_mlx.load would set up
    work = Path(tempfile.mkdtemp(prefix="quant_quality-"))
    if a.model is None:
        from dh_mlx.train.run import train
        a.model = work / "base"
        train(out=a.model, data=a.data, steps=150, progress=False)
    run_cfg = json.loads((a.model / "train_config.json").read_text()) if (a.model / "train_config.json").is_file() \
        else {}
    model = load_model(a.model)
    dr = model.config.domain_routing
    dataset = load_dataset(a.data, load_tokenizer(a.model), seq_len=run_cfg.get("seq_len", 128),
                           domains=dr.domains if dr else None, val_fraction=run_cfg.get("val_fraction", 0.05),
                           seed=run_cfg.get("seed", 0))
    batches = [to_mx(b) for _, b in zip(range(a.batches), dataset.valid_batches(8))]
    setup = f"{a.model}, {sum(int(b.loss_mask.sum().item()) for b in batches)} validation tokens, " \
            f"group size {a.group_size}, {mx.default_device()}"
    ref_ppl, _ = scores(model, model, batches)
    ref_bytes = dir_bytes(a.model)
    print(json.dumps({"name": "float_val_ppl", "value": round(ref_ppl, 3), "unit": "perplexity", "setup": setup,
                      "comparison": {"float_bytes": ref_bytes}}), flush=True)
    for name, bits, recipe in VARIANTS:
        out = work / name
        s = quantize(a.model, out, bits=bits, group_size=a.group_size, recipe=recipe)
        ppl, kl = scores(load_model(out), model, batches)
        size = dir_bytes(out)
        for result in (
            {"name": f"{name}_size", "value": round(size / 1e6, 2), "unit": "MB",
             "comparison": {"float_MB": round(ref_bytes / 1e6, 2), "ratio": round(size / ref_bytes, 3),
                            "bits_per_weight": round(s["bits_per_weight"], 2)}},
            {"name": f"{name}_val_ppl", "value": round(ppl, 3), "unit": "perplexity",
             "comparison": {"float": round(ref_ppl, 3), "relative_change": round(ppl / ref_ppl - 1, 4)}},
            {"name": f"{name}_mean_kl", "value": float(f"{kl:.3g}"), "unit": "nats/token",
             "comparison": {"reference": "float model's next-token distribution"}},
        ):
            print(json.dumps({**result, "setup": setup}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
