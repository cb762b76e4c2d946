"""Device facts: compute dtype and memory, chosen at run time, never hard-coded."""

from __future__ import annotations

import os
import platform
import sys
from contextlib import contextmanager
from typing import Iterator

from . import _blas, _jit

MLX_DEFAULT_BFS_WIDTH = "20"  # MLX's own default for MLX_BFS_MAX_WIDTH
WIDE_BFS_WIDTH = 1000  # what widen_eval_order sets

_blas.load_fast_blas()
import mlx.core as mx  # noqa: E402  (after the BLAS is loaded)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def compute_dtype(requested: str | None = None) -> mx.Dtype:
    """float32 on the CPU backend (the only fast dtype there), bfloat16 on Metal/CUDA, unless asked."""
    if requested:
        if requested not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    return mx.bfloat16 if on_gpu() else mx.float32


def available_memory() -> int:
    """Bytes this process can still allocate without swapping (best effort)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    if on_gpu() and hasattr(mx, "device_info"):
        info = mx.device_info()
        return int(info.get("max_recommended_working_set_size", info.get("memory_size", 0)))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def blas_in_use() -> str:
    return _blas.loaded


def cpu_description() -> str:
    """The CPU benchmarks ran on, e.g. 'AMD EPYC (AuthenticAMD), 2 cores' (the BLAS choice depends on the vendor)."""
    name = _blas.cpuinfo("model name") or platform.processor() or platform.machine()
    vendor = _blas.cpu_vendor()
    return f"{name}{f' ({vendor})' if vendor else ''}, {os.cpu_count()} cores"


def untuned_environ() -> dict[str, str]:
    """This process's environment for a child process that loads OpenBLAS without dh-mlx's CPU tuning (MKL,
    the matrix-vector shim, the kernel flags of _jit.py, the wide MLX evaluation order): the baseline our
    benchmarks run mlx-lm on, as the issues measured it."""
    return dict(os.environ, DH_MLX_BLAS="openblas", DH_MLX_BLAS_SHIM="off", DH_MLX_JIT="off",
                MLX_BFS_MAX_WIDTH=MLX_DEFAULT_BFS_WIDTH)


def cpu_kernel_flags() -> str:
    """Where mx.compile's vectorised CPU kernels are cached, or why MLX's defaults are in use (_jit.py)."""
    return _jit.status


def native_kernels() -> str:
    """Whether dh_mlx/native's CPU kernels (expert segment matmuls, cross-entropy, decode kernels) are in use,
    and why not."""
    if on_gpu():
        return "not used on the GPU"
    from . import native
    native.load()
    return native.status


_side_stream: mx.Stream | None = None
_streams_taken = False


def side_stream() -> mx.Stream | None:
    """A second CPU stream when running on the CPU with more than one core, else None (also while
    `streams_taken` holds: the caller already keeps both streams busy).

    MLX runs each stream on its own thread and its CPU elementwise kernels (exp in softmax above all) on one
    core, so independent halves of a large attention placed on two streams run ~1.6x faster on 2 cores.
    """
    return None if _streams_taken else _second_stream()


def _second_stream() -> mx.Stream | None:
    global _side_stream
    if on_gpu() or (os.cpu_count() or 1) < 2:
        return None
    if _side_stream is None:
        _side_stream = mx.new_stream(mx.cpu)
    return _side_stream


def batch_streams() -> tuple[mx.Stream, mx.Stream] | None:
    """The two CPU streams to split a batch's rows over (default, side), or None where `side_stream` is."""
    side = _second_stream()
    return None if side is None else (mx.default_stream(mx.cpu), side)


def widen_eval_order() -> bool:
    """Let MLX interleave independent work on two streams: sets `MLX_BFS_MAX_WIDTH=1000` unless it is set.
    Returns `wide_eval_order()`. Call it before MLX's first eval in the process (MLX reads the variable once);
    `dh-mlx train`/`lora` and the training benchmarks do.

    MLX orders an eval's work breadth-first up to that many arrays wide (default 20) and keeps only ~10 tasks
    in flight. A training step whose two halves run on two CPU streams (`trainer.build_steps`) then often
    has every task in flight on one stream while the other idles (tiny: ~1000 ms per step against ~630 with
    1000). Only for training: in generation it measured mixed (1b decode and prefill +5-6 %, tiny decode -3 %,
    tiny decode at 4K context 130-200 against 200-210 tokens/s).
    """
    if on_gpu():
        return False
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", str(WIDE_BFS_WIDTH))
    return wide_eval_order()


def eval_order_width() -> str:
    """The `MLX_BFS_MAX_WIDTH` this process asks MLX for (MLX's default when unset)."""
    return os.environ.get("MLX_BFS_MAX_WIDTH", MLX_DEFAULT_BFS_WIDTH)


def wide_eval_order() -> bool:
    """Whether this process asks MLX for an evaluation order wide enough for two-stream training steps
    (tiny's split step measured as fast at 300 as at 1000, and as slow at 100 as at 20)."""
    try:
        return int(eval_order_width()) >= WIDE_BFS_WIDTH // 4
    except ValueError:
        return False


@contextmanager
def streams_taken() -> Iterator[None]:
    """While tracing one of several independent pieces of work put on different streams: model code does not
    split its own work over the side stream."""
    global _streams_taken
    before, _streams_taken = _streams_taken, True
    try:
        yield
    finally:
        _streams_taken = before


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the BLAS with `n` threads per call inside the block (None: leave it). Work split over both CPU
    streams wants 1: each stream's thread then has a core, instead of each call fanning out over both."""
    previous = None if n is None else _blas.set_threads(n)
    try:
        yield
    finally:
        if previous is not None:
            _blas.set_threads(previous)
