"""`dh-mlx lora` and `dh-mlx fuse` as library calls: LoRA fine-tuning through the shared training loop
(`train_loop`, whose export writes the adapters), and merging adapters into a model directory."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..config import load_config
from ..model import Model
from ..outputs import check_output_dir
from ..model.moe import Routing
from ..model.v4_model import DecoderLayer as V4DecoderLayer
from ..checkpoint.weights import load_model, resolve_path, save_model
from ..checkpoint.v4_weights import save_v4_model
from .config import LORA_DEFAULTS, TrainConfig
from .memory import training_peak_bytes
from ..lora import (ADAPTER_CONFIG, LoRAConfig, apply_lora, fuse_lora, load_adapters, lora_parameters, save_adapters,
                   trainable_count)
from ..checkpoint.weights import copy_tokenizer
from .distributed import on_main
from .setup import start_run
from ..files import format_bytes
from .trainer import RunResult, evaluate, train_loop
from ..progress import status

# Fine-tuning defaults that differ from pretraining: the router and its selection bias stay as trained (no ALF,
# no balance loss), adapters start from zero (no weight decay), and MTP modules are not adapted (no MTP loss).


@dataclass
class LoRAResult:
    run: RunResult
    trainable: int
    total: int
    estimated_peak_gb: float
    val_loss_before: float | None  # the base model (fresh adapters are zero); None when resumed
    val_loss: float | None  # None without a validation split
    tokens_per_s: float  # median over the run's steps (the first, which compiles, left out)

    @property
    def share(self) -> float:
        return self.trainable / max(self.total, 1)


# ---- gradient checkpointing --------------------------------------------------------------------------------------
@functools.cache
def _checkpointed(cls: type) -> type:
    """A subclass of a decoder-layer class whose call keeps only its inputs for the backward pass."""

    def __call__(self, x, mask="causal", cache=None, domain_ids=None, shared=None):
        def inner(params, x, mask, domain_ids):
            self.update(params)
            h, r = cls.__call__(self, x, mask, cache, domain_ids, shared)
            # `+ 0`: MLX 0.32's checkpoint misaligns cotangents when an output is a stop_gradient node
            return h, None if r is None else (r.indices + 0, r.weights, r.scores)

        h, routing = mx.checkpoint(inner)(self.trainable_parameters(), x, mask, domain_ids)
        return h, None if routing is None else Routing(*routing)  # (checkpoint returns plain tuples)

    def v4_call(self, streams, ids, cache=None, mask="causal"):  # DeepSeek-V4's layer: (streams, token ids)
        def inner(params, streams, mask):
            self.update(params)
            h, r = cls.__call__(self, streams, ids, cache, mask)
            return h, (r.indices + 0, r.weights, r.scores)

        h, routing = mx.checkpoint(inner)(self.trainable_parameters(), streams, mask)
        return h, Routing(*routing)

    call = v4_call if issubclass(cls, V4DecoderLayer) else __call__
    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": call})


def grad_checkpoint(model: Model) -> None:
    """Recompute each main-stack decoder layer in the backward pass (per instance; other models are untouched)."""
    for layer in model.layers:
        layer.__class__ = _checkpointed(type(layer))


# ---- memory ------------------------------------------------------------------------------------------------------
def estimate_peak_bytes(model: Model, cfg: TrainConfig, *, checkpointing: bool) -> int:
    """`memory.training_peak_bytes` for the model as it is: its weights' bytes (a quantized base's too) and its
    trainable parameters."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return sum(training_peak_bytes(model.config, cfg, dtype_size=model.model.norm.weight.dtype.size,
                                   trainable=trainable, weights=weights, checkpointing=checkpointing).values())


# ---- the commands ----------------------------------------------------------------------------------------------
def _check_same_adapters(out: Path, now: dict) -> None:
    p = out / ADAPTER_CONFIG
    if not p.is_file():
        return
    before = json.loads(p.read_text()).get("lora_parameters", {})
    changed = [k for k in ("rank", "scale", "keys") if before.get(k) != now.get(k)]
    if changed:
        raise ValueError(f"{out}: the run to resume has other LoRA settings ({', '.join(changed)}); resume with "
                         "the same `rank`, `alpha`, `targets`, `experts` and `num_layers` or choose another `out`")


def lora(*, model: str | Path, data: str | Path, out: str | Path, tokenizer: str | Path | None = None,
         rank: int = LoRAConfig.rank, alpha: float = LoRAConfig.alpha, dropout: float = LoRAConfig.dropout,
         targets: Sequence[str] | None = None, num_layers: int | None = None, experts: bool = LoRAConfig.experts,
         grad_checkpointing: bool = False, resume: bool = False, force: bool = False, progress: bool = True,
         stop_after: int | None = None, dtype: str | None = None, bits: int | None = None,
         group_size: int | None = None, seed: int = 0, **options) -> LoRAResult:
    """Fine-tune LoRA adapters on the model directory `model` (float or quantized: QLoRA) with the training loop
    of `dh-mlx train`; `out` receives `adapters.safetensors` + `adapter_config.json` and the checkpoints.
    `bits` quantizes a float or FP8 base as it loads (QLoRA without a quantized copy on disk).
    `options` are `TrainConfig` fields (defaults: `LORA_DEFAULTS`, else TrainConfig's)."""
    base = resolve_path(model)
    cfg = TrainConfig(**{**LORA_DEFAULTS, "seed": seed, **options})
    lc = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets, num_layers=num_layers,
                    experts=experts)
    run = start_run(out, tokenizer=tokenizer or base, inputs=[base, data], resume=resume, force=force,
                    vocab_size=load_config(base).vocab_size)
    out, w = run.out, run.w
    m = load_model(base, dtype=dtype, bits=bits, group_size=group_size)
    dataset = run.open_data(data, cfg, m.config.domain_routing.names if m.config.domain_routing else None)
    apply_lora(m, lc, seed=seed)
    if resume:
        on_main(w, _check_same_adapters, out, lora_parameters(m.config, lc))
    if grad_checkpointing:
        grad_checkpoint(m)
    trainable, total = trainable_count(m)
    estimate = estimate_peak_bytes(m, cfg, checkpointing=grad_checkpointing) / 1e9
    if w.main:
        status(f"LoRA: {trainable:,} trainable parameters ({trainable / total:.3%} of {total:,}); estimated peak "
               f"memory {estimate:.3g} GB")
    has_val = len(dataset.valid) > 0
    before = None if resume or not has_val else evaluate(m, dataset, cfg, w=w).loss

    def export(d: Path) -> None:
        quantized = {"base_bits": bits, "base_group_size": group_size} if bits else {}
        save_adapters(m, d, lc, extra={"model": str(base), **quantized, "train_config": cfg.to_dict()})

    adapters = sum(v.nbytes for _, v in tree_flatten(m.trainable_parameters()))  # what `export` writes
    run = train_loop(m, dataset, cfg, out, export=export, resume=resume, force=force, progress=progress,
                     stop_after=stop_after, w=w, export_bytes=adapters)
    m.eval()  # dropout off
    val = evaluate(m, dataset, cfg, w=w).loss if has_val else None
    tps = [r["tokens_per_s"] for r in run.history[1:]] or [run.tokens_per_s]
    return LoRAResult(run, trainable, total, estimate, before, val, float(np.median(tps)))


def fuse(*, model: str | Path, adapter: str | Path, out: str | Path, keep_quantized: bool = False,
         dtype: str | None = None, force: bool = False) -> Model:
    """Merge the adapters in `adapter` into the model directory `model`, writing a plain model directory `out`
    (a quantized base is dequantized unless `keep_quantized`; then the adapted matrices are re-quantized)."""
    base = resolve_path(model)
    check_output_dir(out, inputs=[base, adapter], force=force)
    m = load_adapters(load_model(base, dtype=dtype), adapter)
    fuse_lora(m, keep_quantized=keep_quantized)
    if m.config.model_type == "deepseek_v4":
        save_v4_model(m, Path(out))
    else:
        save_model(m, out)
    copy_tokenizer(base, Path(out))
    return m


def describe(result: LoRAResult) -> str:
    r = result.run
    state = "interrupted at" if r.interrupted else "finished"
    before = f" (base {result.val_loss_before:.3f})" if result.val_loss_before is not None else ""
    val = "no validation split" if result.val_loss is None else f"validation loss {result.val_loss:.3f}{before}"
    return (f"{state} step {r.step}: train loss {r.train_loss:.3f}, {val}, "
            f"{result.tokens_per_s:.0f} tokens/s, peak memory {r.peak_memory_gb:.3g} GB (estimated "
            f"{result.estimated_peak_gb:.3g} GB); {result.trainable:,} trainable parameters "
            f"({result.share:.3%}); {r.run_dir} holds {format_bytes(r.run_bytes)}")
