"""The CPU's second stream and MLX's evaluation order: how independent work runs on two cores.

MLX runs each stream on its own thread and most CPU kernels single-threaded, so independent halves of a
large attention, cross-entropy or optimizer update placed on two streams use both cores. A training step
splits its batch over the two streams itself; while it traces one half, `Streams.taken` is set and the
operations inside do not split again.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx

MLX_DEFAULT_BFS_WIDTH = "20"  # MLX's own default for MLX_BFS_MAX_WIDTH
WIDE_BFS_WIDTH = 1000  # what widen_eval_order sets


class Streams:
    """The default CPU stream and a second one; `side()` is the second unless `taken`. MLX's streams belong to
    the thread that made them: on any other thread (a server's engine may run in one) `side()` is None and the
    work stays on that thread's default stream."""

    def __init__(self) -> None:
        self.main = mx.default_stream(mx.cpu)
        self.second = mx.new_stream(mx.cpu)
        self.owner = threading.get_ident()
        self.taken = False

    def side(self) -> mx.Stream | None:
        """Where an operation may put half of its work, or None while the caller keeps both streams busy (or
        off the CPU, or on another thread)."""
        if self.taken or mx.default_device() != mx.cpu or threading.get_ident() != self.owner:
            return None
        return self.second

    @contextmanager
    def running(self, stream: mx.Stream) -> Iterator[None]:
        """Trace work for `stream`, one of several independent pieces on different streams."""
        before, self.taken = self.taken, True
        try:
            with mx.stream(stream):
                yield
        finally:
            self.taken = before

    def pair(self) -> tuple[mx.Stream, mx.Stream]:
        return self.main, self.second


def make_streams() -> Streams | None:
    """Two CPU streams on a machine with more than one core, else None."""
    return Streams() if (os.cpu_count() or 1) >= 2 else None


def widen_eval_order() -> bool:
    """Ask MLX to order an eval's work breadth-first up to WIDE_BFS_WIDTH arrays (`MLX_BFS_MAX_WIDTH`, unless
    set). MLX reads the variable at its first eval. With MLX's default width of 20 a step split over two streams
    often has every task in flight on one stream while the other idles. Returns `wide_eval_order()`."""
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", str(WIDE_BFS_WIDTH))
    return wide_eval_order()


def eval_order_width() -> str:
    """The `MLX_BFS_MAX_WIDTH` this process asks MLX for (MLX's default when unset)."""
    return os.environ.get("MLX_BFS_MAX_WIDTH", MLX_DEFAULT_BFS_WIDTH)


def wide_eval_order() -> bool:
    """Whether this process asks MLX for an evaluation order wide enough for two-stream training steps."""
    try:
        return int(eval_order_width()) >= WIDE_BFS_WIDTH // 4
    except ValueError:
        return False
