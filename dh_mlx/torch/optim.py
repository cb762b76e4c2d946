"""The twin's optimizer and learning-rate schedule: MLX's (`dh_mlx/train/optim.py`), value for value.

    lr(s)   = lr/W + s * (lr - lr/W) / W                       for s < W (W = warmup_steps > 0; linear warmup)
            = m + (lr - m) * (1 + cos(pi * min(s', N) / N)) / 2   otherwise, s' = s - W, N = max(steps - W, 1),
                                                                  m = lr * min_lr_ratio (cosine decay)
    where s counts the optimizer steps taken before this one (the first step uses lr(0)), as mlx.optimizers'
    `join_schedules([linear_schedule, cosine_decay])` evaluates it.

    clip    = 1 if |g| < grad_clip else grad_clip / (|g| + 1e-6)     (|g|: the global norm of all gradients)
    m       = b1 m + (1 - b1) clip g,   v = b2 v + (1 - b2) (clip g)^2          (b1, b2 = 0.9, 0.95)
    p       = p (1 - lr(s) wd) - lr(s) m / (sqrt(v) + 1e-8)                     (no bias correction)

torch.optim.AdamW always corrects the moments' bias (its first step moves each weight by ~lr, MLX's by
~0.45 lr), so the twin has its own; a trainable parameter without a gradient (one the loss did not reach) is
updated as MLX updates it, with a zero gradient: its moments decay and weight decay applies.
FSDP2's sharded gradients (DTensors) take their norm over all ranks.
"""

from __future__ import annotations

import math

import torch

from ..train.config import TrainConfig

BETAS = (0.9, 0.95)
EPS = 1e-8


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of the optimizer step that follows `step` earlier ones (lr(s) above)."""
    w = cfg.warmup_steps
    if w and step < w:
        return step * ((cfg.lr - cfg.lr / w) / w) + cfg.lr / w
    n = max(cfg.steps - w, 1)
    end = cfg.lr * cfg.min_lr_ratio
    return end + 0.5 * (1.0 + math.cos(math.pi / n * min(step - w, n))) * (cfg.lr - end)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of `grads` (float32), over every rank's shard of a sharded (DTensor) gradient."""
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class AdamW(torch.optim.Optimizer):
    """MLX's AdamW with global-norm clipping folded into the update (module docstring); `step()` returns the
    unclipped gradient norm. Its step count (`steps_taken`) picks the learning rate from `cfg`'s schedule."""

    def __init__(self, params, cfg: TrainConfig):
        super().__init__(params, dict(lr=learning_rate(cfg, 0), betas=BETAS, eps=EPS,
                                      weight_decay=cfg.weight_decay))
        self.cfg = cfg
        self.steps_taken = 0

    @torch.no_grad()
    def step(self, closure=None) -> torch.Tensor:
        if closure is not None:
            raise ValueError("AdamW.step: closure is not supported")
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = grad_norm([p.grad for p in params]) if params else torch.zeros(())
        clip = self.cfg.grad_clip
        scale = 1.0 if norm.item() < clip else clip / (norm.item() + 1e-6)
        lr = learning_rate(self.cfg, self.steps_taken)
        for group in self.param_groups:
            group["lr"] = lr
            (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["m"], state["v"]
                if p.grad is None:  # unused this step (a deeper MTP module): MLX's zero gradient, decay still applies
                    m.mul_(b1)
                    v.mul_(b2)
                else:
                    g = p.grad * scale if scale != 1.0 else p.grad
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.mul_(1 - lr * wd).sub_(lr * m / (v.sqrt() + eps))
        self.steps_taken += 1
        return norm
