"""Device facts: compute dtype and memory, chosen at run time, never hard-coded."""

from __future__ import annotations

import os
import sys

from . import _blas, _jit

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


def untuned_environ() -> dict[str, str]:
    """This process's environment for a child process that loads OpenBLAS without dh-mlx's CPU tuning (MKL,
    the matrix-vector shim, the kernel flags of _jit.py): the baseline our benchmarks run mlx-lm on, as the
    issues measured it."""
    return dict(os.environ, DH_MLX_BLAS="openblas", DH_MLX_BLAS_SHIM="off", DH_MLX_JIT="off")


def cpu_kernel_flags() -> str:
    """Where mx.compile's vectorised CPU kernels are cached, or why MLX's defaults are in use (_jit.py)."""
    return _jit.status


_side_stream: mx.Stream | None = None


def side_stream() -> mx.Stream | None:
    """A second CPU stream when running on the CPU with more than one core, else None.

    MLX runs each stream on its own thread and its CPU elementwise kernels (exp in softmax above all) on one
    core, so independent halves of a large attention placed on two streams run ~1.6x faster on 2 cores.
    """
    global _side_stream
    if on_gpu() or (os.cpu_count() or 1) < 2:
        return None
    if _side_stream is None:
        _side_stream = mx.new_stream(mx.cpu)
    return _side_stream
