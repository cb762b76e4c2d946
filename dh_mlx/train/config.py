"""Training hyper-parameters (one dataclass), validated with errors that name the field."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    alf_gamma: float = 1e-3  # auxiliary-loss-free bias step; 0 turns ALF off
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight; 0 turns it off
    mtp_lambda: float = 0.3  # MTP loss weight (used when the model has MTP modules)
    # Train only the MTP modules, towards the main model's own next-token distribution (self-distillation: the main
    # model, its routing biases included, stays as it is); raises the acceptance of `--mtp` decoding.
    mtp_distill: bool = False
    # Share of training rows whose domain ids are hidden, so plain DeepSeek-V3 routing (no --domain) is
    # trained too and may use every expert.
    domain_dropout: float = 0.25
    val_fraction: float = 0.05
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 1  # the newest K checkpoints (weights + optimizer state) stay in checkpoints/
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every",
                    "keep_checkpoints")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"training option '{name}' must be an integer >= 1, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"training option 'seed' must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("lr", "grad_clip", "alf_gamma", "balance_alpha", "mtp_lambda", "weight_decay", "min_lr_ratio",
                     "domain_dropout", "val_fraction"):
            v = getattr(self, name)  # inf or NaN would train a model nothing can load
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"training option '{name}' must be a finite number, got {v!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"training option '{name}' must be > 0, got {getattr(self, name)!r}")
        for name in ("alf_gamma", "balance_alpha", "mtp_lambda", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"training option '{name}' must be >= 0, got {getattr(self, name)!r}")
        if self.mtp_distill and not self.mtp_lambda > 0:
            raise ValueError("training option 'mtp_lambda' must be > 0 with 'mtp_distill' (the MTP loss is what "
                             f"it trains), got {self.mtp_lambda!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"training option 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.domain_dropout <= 1:
            raise ValueError(f"training option 'domain_dropout' must be in [0, 1], got {self.domain_dropout!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"training option 'val_fraction' must be in [0, 1), got {self.val_fraction!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# What `dh-mlx lora` changes from TrainConfig's defaults: fewer steps, a LoRA-sized learning rate, no weight
# decay, and no router or MTP terms (the base model's routing and MTP module stay as they are).
LORA_DEFAULTS = dict(steps=100, lr=1e-3, warmup_steps=10, weight_decay=0.0, alf_gamma=0.0, balance_alpha=0.0,
                     mtp_lambda=0.0, eval_every=50, save_every=100)
