"""Training the twin on GPU clusters: `torchrun --nproc_per_node N -m dh_mlx.torch.train --data x.jsonl ...`.

PyTorch's FSDP2 (`fully_shard`, one unit per decoder layer and the root) shards the parameters, gradients and AdamW
state over the ranks; torch.distributed is the engine (NCCL on CUDA, gloo on the CPU). The data is
`dh_mlx.train.prepared`'s (prepared shards, a mixture, or JSONL prepared once into the cache; numpy only): every
rank draws the same global batch (batch_size x ranks packed rows, one seeded order, the same domain dropout) and
reads its own rows. The step is `dh-mlx train`'s (`step.py`, `optim.py`, the same `TrainConfig`): document-masked
attention, the loss mask, MTP at depth 1, the balance loss, MLX's AdamW, clipping and schedule. Each rank's
losses are its rows' shares of the global batch's (divided by the global token counts), so the gradients FSDP
reduces add up to the global batch's. ALF sums the experts' loads over the ranks before moving the biases
(buffers, the same on every rank). Rank 0 writes `metrics.jsonl` and, at the end, the model directory (full weights
gathered to it), which dh-mlx loads with the twin's logits. Without torchrun this is one process on one device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.layout import copy_tokenizer
from ..config import DATA_DIR, load_config, resolve_config
from ..files import write_atomic
from ..outputs import check_output_dir
from ..train.config import TrainConfig
from .model import Model
from .step import Batch, Counts, alf_update, check_config, loss_terms, make_optimizer, mtp_mask
from .weights import default_device, load_model, random_model, save_model


def _ranked() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def shard(model: Model) -> Model:
    """FSDP2 units: each decoder layer of the main stack, then the root (embedding, norm, head, MTP modules);
    the root's other entry points unshard it too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for layer in list(model.model.layers)[: model.config.num_hidden_layers]:
        fully_shard(layer)
    fully_shard(model)
    for method in ("forward_full", "mtp_forward"):
        register_fsdp_forward_method(model, method)
    return model


def train(*, data: str | Path, out: str | Path, init: str | Path | None = None, config: str | Path | None = None,
          params: str | None = None, tokenizer: str | Path | None = None, force: bool = False,
          train_config: TrainConfig | None = None, log_every: int = 1) -> list[dict]:
    """Train for `train_config.steps` optimizer steps (FSDP2 under torchrun) and write the model directory `out`;
    returns the per-step records. `train_config`'s evaluation and checkpoint options do not apply here."""
    from ..tokenizer import load_tokenizer
    from ..train.data import drop_domains
    from ..train.prepared import open_dataset
    tc = train_config or TrainConfig()
    check_config(tc)
    if _ranked() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = default_device()
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    out = Path(out)
    if rank == 0:
        check_output_dir(out, inputs=[init, data, tokenizer, config], force=force)
    tok_dir = Path(tokenizer or init or DATA_DIR / "tokenizer")
    tok = load_tokenizer(tok_dir)
    if tok is None:
        raise ValueError(f"{tok_dir}: no tokenizer.model or tokenizer.json (pass --tokenizer)")
    model_config = load_config(init) if init else resolve_config(params, config)
    model = (load_model(init, device=device, dtype="float32") if init else
             random_model(model_config, seed=tc.seed, device=device, dtype=torch.float32))
    domains = model_config.domain_routing.names if model_config.domain_routing else None
    dataset = open_dataset(data, tok, seq_len=tc.seq_len, domains=domains, val_fraction=tc.val_fraction,
                           seed=tc.seed, skip_invalid=tc.skip_invalid, progress=rank == 0)
    part = (rank, size)
    batches = dataset.train_batches(tc.batch_size * size, seed=tc.seed, part=part)  # this rank's rows
    if size > 1:
        shard(model)
    optimizer = make_optimizer(model, tc)
    records = []
    for step in range(tc.steps):
        tic = time.perf_counter()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        parts, loads = torch.zeros(4, device=device), None
        for micro in range(tc.grad_accum):  # each micro-batch's mean, averaged (as dh-mlx train)
            rows = drop_domains(next(batches), tc.domain_dropout, tc.seed, step * tc.grad_accum + micro, part)
            b = Batch.from_numpy(rows, device)
            terms = loss_terms(model, b, mtp_lambda=tc.mtp_lambda, balance_alpha=tc.balance_alpha,
                               counts=_global_counts(b, size))
            # FSDP averages the ranks' gradients; their shares add up, so scale by the ranks to get the sum
            (terms.loss * (size / tc.grad_accum)).backward()
            parts += torch.stack([terms.loss, terms.ce, terms.mtp, terms.balance]).detach() / tc.grad_accum
            loads = terms.loads if loads is None else loads + terms.loads
        norm = optimizer.step()
        if tc.alf_gamma:  # the experts' loads summed over the ranks, so every rank moves its biases alike
            alf_update(model, loads, tc.alf_gamma, reduce=dist.all_reduce if dist.is_initialized() else None)
        if dist.is_initialized():
            dist.all_reduce(parts)  # the ranks' shares add up to the global batch's terms
        loss, ce, mtp, bal = parts.tolist()
        records.append({"step": step + 1, "loss": loss, "ce": ce, "mtp": mtp, "balance": bal,
                        "lr": optimizer.param_groups[0]["lr"], "grad_norm": norm.item(), "ranks": size,
                        "tokens_per_s": tc.batch_size * size * tc.seq_len * tc.grad_accum
                        / (time.perf_counter() - tic)})
        if rank == 0 and ((step + 1) % log_every == 0 or step + 1 == tc.steps):
            print(f"step {step + 1}/{tc.steps}: loss {loss:.4f} ce {ce:.4f} | {records[-1]['tokens_per_s']:.0f} "
                  f"tok/s | {size} rank(s)", file=sys.stderr, flush=True)
    _write(model, out, tok_dir, records, rank)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return records


def _global_counts(b: Batch, size: int) -> Counts:
    """The global batch's target and MTP-target counts (summed over the ranks) and rows."""
    c = torch.stack([b.loss_mask.sum(), mtp_mask(b.loss_mask).sum()])
    if size > 1:
        dist.all_reduce(c)
    return Counts(c[0], c[1], b.loss_mask.shape[0] * size)


def _write(model: Model, out: Path, tok_dir: Path, records: list[dict], rank: int) -> None:
    """The full weights gathered on rank 0, saved as a model directory with its tokenizer and metrics."""
    state = model.state_dict()
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    plain = Model(model.config)
    plain.load_state_dict({k: v.to("cpu") for k, v in state.items()})
    save_model(plain, out)
    copy_tokenizer(tok_dir, out)
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


# The options `dh-mlx train` takes too, under its names, with TrainConfig's defaults.
OPTIONS = {"steps": ("steps", "optimizer steps"), "batch_size": ("batch-size", "rows per rank per micro-batch"),
           "seq_len": ("seq-len", "tokens per row"), "grad_accum": ("grad-accum", "micro-batches per optimizer step"),
           "lr": ("lr", "peak learning rate (AdamW, warmup then cosine)"), "warmup_steps": ("warmup", "warmup steps"),
           "seed": ("seed", "init, data order and split seed"),
           "alf_gamma": ("alf-gamma", "auxiliary-loss-free bias step (0: off)"),
           "balance_alpha": ("balance-alpha", "sequence-wise balance loss weight (0: off)"),
           "mtp_lambda": ("mtp-lambda", "MTP loss weight")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dh_mlx.torch.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared directory (dh-mlx data prepare), mixture .json, or JSONL "
                                                 "file or directory (prepared once into the cache)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--init", help="start from this model directory")
    p.add_argument("--config", help="a config.json (instead of --params or --init)")
    p.add_argument("--params", help="size preset")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --init's, else the bundled one)")
    defaults = TrainConfig()
    for field, (flag, help) in OPTIONS.items():
        v = getattr(defaults, field)
        p.add_argument(f"--{flag}", dest=field, type=type(v), default=v, help=f"{help} (default {v})")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and count) invalid JSONL lines")
    p.add_argument("--force", action="store_true", help="write over a non-empty --out")
    a = p.parse_args(argv)
    try:
        tc = TrainConfig(skip_invalid=a.skip_invalid, **{k: getattr(a, k) for k in OPTIONS})
        train(data=a.data, out=a.out, init=a.init, config=a.config, params=a.params, tokenizer=a.tokenizer,
              force=a.force, train_config=tc)
    except (ValueError, OSError, ImportError) as e:  # ImportError: a PyTorch without FSDP2 (fully_shard)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
