"""The optimizer: mlx's AdamW with clipping folded into the update, its work spread over two streams if given."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from .. import backend
from ..ops import replaceable
from .config import TrainConfig


class AdamW(optim.AdamW):
    """mlx's AdamW with global-norm clipping folded into the update: the clip factor multiplies the gradient
    inside the update instead of in a pass of its own. Given `streams` (the CPU backend's two streams), each
    parameter's squared norm and update run on one of them, balanced by size: these elementwise chains over
    every parameter run single-threaded on the CPU. Same arithmetic as `optim.clip_grad_norm` + `optim.AdamW`,
    same state (checkpoints and resume unchanged).
    """

    grad_scale: mx.array | None = None

    def __init__(self, *args, streams=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.streams = streams
        b1, b2 = self.betas
        # [1, b1, 1 - b1, b2, 1 - b2, eps], one array for the main stream and one for the side: see apply_single
        self._constants = [mx.array([1.0, b1, 1 - b1, b2, 1 - b2, self.eps]) for _ in range(2)]

    def _plan(self, gradients: dict) -> None:
        self._side = set()
        if self._side_stream() is not None:
            loads = [0, 0]
            for g in sorted((g for _, g in tree_flatten(gradients)), key=lambda g: -g.size):
                s = int(loads[1] < loads[0])  # greedy balance of elements per stream
                loads[s] += g.size
                if s:
                    self._side.add(id(g))

    def _side_stream(self) -> mx.Stream | None:
        return None if self.streams is None else self.streams.side()

    def _stream(self, g: mx.array):
        if id(g) in self._side:
            return mx.stream(self._side_stream())
        return mx.stream(mx.default_stream(mx.default_device()))

    def clip_and_update(self, model: nn.Module, gradients: dict, max_norm: float) -> mx.array:
        """`optim.clip_grad_norm(gradients, max_norm)` then `update(model, ...)`; returns the unclipped norm."""
        # MLX's gradients of `x @ W.T` come out as transposed views (model.layers.linear avoids that; a tied
        # embedding head or another module may not); strided elementwise kernels are not vectorised, so one
        # copy to row-major order first lets the norm and the update vectorise (a no-op when row-major).
        self._plan(gradients)
        squares, flat = [], []
        for k, g in tree_flatten(gradients):
            with self._stream(g):
                g = mx.contiguous(g)
                squares.append(squared_norm(g))
            flat.append((k, g))
        gradients = tree_unflatten(flat)
        self._plan(gradients)  # same sizes, same streams
        norm = mx.sqrt(mx.stack(squares).sum())
        self.grad_scale = mx.where(norm < max_norm, 1.0, max_norm / (norm + 1e-6))
        try:
            model.update(super().apply_gradients(gradients, model))
        finally:
            self.grad_scale = None
        return norm

    def sum_gradients(self, trees: list[dict]) -> dict:
        """The sum of gradient trees, in row-major order, each parameter's sum on its stream."""
        self._plan(trees[0])
        flat = []
        for leaves in zip(*(tree_flatten(t) for t in trees)):
            key, g = leaves[0]
            with self._stream(g):
                flat.append((key, mx.contiguous(sum((l for _, l in leaves[1:]), g))))
        return tree_unflatten(flat)

    def apply_gradients(self, gradients: dict, parameters: dict):
        self._plan(gradients)
        return super().apply_gradients(gradients, parameters)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        """mlx's AdamW update (no bias correction), its constants read from this stream's own array.

        mx.compile merges equal nodes whatever their stream, so a constant's broadcast to a shape that
        parameters on both streams have would be one node; the other stream's kernel cannot fuse it and
        reads it as a strided input, running MLX's unvectorised strided loop."""
        if self.bias_correction:
            raise ValueError("AdamW: bias_correction is not supported by this optimizer")
        with self._stream(gradient):
            c = self._constants[id(gradient) in self._side]
            one, b1, c1, b2, c2, eps = (c[i] for i in range(6))
            lr = self.learning_rate.astype(gradient.dtype) * one
            if self.grad_scale is not None:
                gradient = gradient * (self.grad_scale.astype(gradient.dtype) * one)
            m = b1 * state["m"] + c1 * gradient
            v = b2 * state["v"] + c2 * mx.square(gradient)
            state["m"], state["v"] = m, v
            return parameter * (1 - lr * self.weight_decay) - lr * m / (mx.sqrt(v) + eps)


@replaceable("squared_norm")
def squared_norm(g: mx.array) -> mx.array:
    """sum(g ** 2) in float32."""
    return g.reshape(-1).astype(mx.float32).square().sum()


def make_optimizer(cfg: TrainConfig, streams="auto") -> AdamW:
    """The run's AdamW and learning-rate schedule; `streams`: see AdamW (default: the CPU backend's)."""
    if streams == "auto":
        streams = backend.setup().streams
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    cosine = optim.cosine_decay(cfg.lr, decay_steps, cfg.lr * cfg.min_lr_ratio)
    schedule = cosine if cfg.warmup_steps == 0 else optim.join_schedules(
        [optim.linear_schedule(cfg.lr / cfg.warmup_steps, cfg.lr, cfg.warmup_steps), cosine], [cfg.warmup_steps])
    return AdamW(learning_rate=schedule, betas=[0.9, 0.95], eps=1e-8, weight_decay=cfg.weight_decay,
                 streams=streams)
