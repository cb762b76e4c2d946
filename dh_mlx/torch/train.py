"""Training the twin on GPU clusters: `torchrun --nproc_per_node N -m dh_mlx.torch.train --data x.jsonl ...`.

PyTorch's FSDP2 (`fully_shard`, one unit per decoder layer and the root) shards the parameters, gradients and AdamW
state over the ranks; torch.distributed is the engine (NCCL on CUDA, gloo on the CPU). The data is
`dh_mlx.train.prepared`'s (prepared shards, a mixture, or JSONL prepared once into the cache; numpy only): every
rank draws the same global batch (batch_size x ranks packed rows, one seeded order) and reads its own rows; the loss
is the twin's (`step.loss_terms`: causal attention over each packed row, every position counted), so the gradients
FSDP averages are the global batch's. ALF sums the experts' loads over the ranks before moving the biases (buffers,
the same on every rank). Rank 0 writes `metrics.jsonl` and, at the end, the model directory (full weights gathered
to it), which dh-mlx loads with the twin's logits. Without torchrun this is one process on one device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint.layout import copy_tokenizer
from ..config import DATA_DIR, load_config, resolve_config
from ..outputs import check_output_dir
from ..files import write_atomic
from .model import Model
from .step import TrainConfig, alf_update, loss_terms
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
          params: str | None = None, tokenizer: str | Path | None = None, steps: int = 100, batch_size: int = 8,
          seq_len: int = 128, seed: int = 0, force: bool = False, train_config: TrainConfig | None = None,
          log_every: int = 1) -> list[dict]:
    """Train (FSDP2 under torchrun) and write the model directory `out`; returns the per-step records."""
    from ..tokenizer import load_tokenizer
    from ..train.prepared import open_dataset
    tc = train_config or TrainConfig()
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
             random_model(model_config, seed=seed, device=device, dtype=torch.float32))
    domains = model_config.domain_routing.names if model_config.domain_routing else None
    dataset = open_dataset(data, tok, seq_len=seq_len, domains=domains, seed=seed, progress=rank == 0)
    batches = dataset.train_batches(batch_size * size, seed=seed, part=(rank, size))  # this rank's rows
    if size > 1:
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, eps=tc.eps,
                                  weight_decay=tc.weight_decay)
    records = []
    for step in range(1, steps + 1):
        tic = time.perf_counter()
        b = next(batches)
        ids = torch.from_numpy(np.concatenate([b.inputs, b.targets[:, -1:]], axis=1).astype(np.int64))
        dom = torch.from_numpy(b.domain_ids.astype(np.int64)) if domains else None
        model.train()
        optimizer.zero_grad(set_to_none=True)
        terms = loss_terms(model, ids.to(device), None if dom is None else dom.to(device),
                           mtp_lambda=tc.mtp_lambda, balance_alpha=tc.balance_alpha)
        terms.loss.backward()
        optimizer.step()
        if tc.alf_gamma:  # the experts' loads summed over the ranks, so every rank moves its biases alike
            alf_update(model, terms.routing, tc.alf_gamma,
                       reduce=dist.all_reduce if dist.is_initialized() else None)
        parts = torch.stack([terms.loss, terms.ce, terms.mtp, terms.balance]).detach()
        if dist.is_initialized():
            dist.all_reduce(parts)
            parts /= size
        loss, ce, mtp, bal = parts.tolist()
        records.append({"step": step, "loss": loss, "ce": ce, "mtp": mtp, "balance": bal, "ranks": size,
                        "tokens_per_s": batch_size * size * seq_len / (time.perf_counter() - tic)})
        if rank == 0 and (step % log_every == 0 or step == steps):
            print(f"step {step}/{steps}: loss {loss:.4f} ce {ce:.4f} | {records[-1]['tokens_per_s']:.0f} tok/s "
                  f"| {size} rank(s)", file=sys.stderr, flush=True)
    _write(model, out, tok_dir, records, rank)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return records


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dh_mlx.torch.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared directory (dh-mlx data prepare), mixture .json, or JSONL "
                                                 "file or directory (prepared once into the cache)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--init", help="start from this model directory")
    p.add_argument("--config", help="a config.json (instead of --params or --init)")
    p.add_argument("--params", help="size preset")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --init's, else the bundled one)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="rows per rank")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write over a non-empty --out")
    a = p.parse_args(argv)
    try:
        train(data=a.data, out=a.out, init=a.init, config=a.config, params=a.params, tokenizer=a.tokenizer,
              steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed, force=a.force,
              train_config=TrainConfig(lr=a.lr))
    except (ValueError, OSError, ImportError) as e:  # ImportError: a PyTorch without FSDP2 (fully_shard)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
