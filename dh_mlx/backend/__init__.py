"""Backends: the process setup and the faster implementations of the replaceable operations (dh_mlx.ops),
in one place. `setup()` is what the CLI and `dh_mlx.load` call; the model never imports this package.

Each part has its switch: `DH_MLX_BLAS=off` (the BLAS loaded when dh_mlx is imported), `DH_MLX_BLAS_SHIM=off`,
`DH_MLX_JIT=off` (compiler flags for mx.compile's CPU kernels), `DH_MLX_NATIVE=off` (native kernels) and
`DH_MLX_BACKEND=off` (no operation replaced: the reference path that Metal runs). Off the CPU only the
reference operations run.
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from .cpu import blas, jit


def _off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("off", "0", "none")


@dataclass
class Setup:
    """What `setup()` did in this process."""

    replaced: list[str] = field(default_factory=list)  # operations with a CPU implementation
    streams: Any = None  # cpu.streams.Streams, or None (one core, a GPU, or the backend off)
    evaluated: bool = False  # setup ran MLX work (the native self-test): MLX's evaluation order is now fixed
    wide_eval_order: bool = False  # MLX was asked for the wide evaluation order before its first eval


_done: Setup | None = None


def setup(*, training: bool = False) -> Setup:
    """Set up the process for dh-mlx (idempotent): the compiler flags, the native kernels and the CPU
    implementations of the replaceable operations. `training=True` first asks MLX for the wide evaluation
    order that two-stream training steps need; it only takes effect before MLX's first eval in the process."""
    global _done
    first = _done is None
    if first:
        _done = Setup()
        jit.enable()  # before MLX compiles its first kernel
    import mlx.core as mx

    from .cpu import streams as cpu_streams
    if training and mx.default_device() == mx.cpu and not _done.evaluated:
        _done.wide_eval_order = cpu_streams.widen_eval_order()
    elif first:
        _done.wide_eval_order = cpu_streams.wide_eval_order()
    if first and not _off("DH_MLX_BACKEND") and mx.default_device() == mx.cpu:
        _install(_done)
    return _done


def _install(done: Setup) -> None:
    from .cpu import attention, experts, layers, native, quantized, training
    from .cpu.streams import make_streams
    from .. import ops as seam

    native.load()  # builds once per machine (cached); its self-test evaluates MLX arrays
    done.evaluated = True
    done.streams = make_streams()
    impls = {**layers.IMPLEMENTATIONS, **experts.IMPLEMENTATIONS, **quantized.IMPLEMENTATIONS,
             **{k: v for k, v in attention.make(done.streams).items() if not k.startswith("_")},
             **{k: v for k, v in training.make(done.streams).items() if not k.startswith("_")}}
    for name, impl in impls.items():
        seam.register(name, impl)
    done.replaced = sorted(impls)


def training_streams():
    """The two CPU streams a training step may split its batch over, or None: off the CPU, on one core, with
    the backend off, or when the process did not ask MLX for the wide evaluation order in time
    (`setup(training=True)` after the setup's own first eval; an eval of the caller's before any setup goes
    unnoticed, and the step then splits under MLX's narrow order: the same numbers, more slowly)."""
    s = setup()
    return s.streams if s.wide_eval_order else None


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the BLAS, and the native weight kernels, with at most `n` threads per call inside the block (None:
    leave them). Work split over both CPU streams wants 1: each stream's thread then has a core."""
    from .cpu import native
    ext = None if n is None else native.loaded()
    previous = None if n is None else blas.set_threads(n)
    previous_native = None if ext is None else ext.limit_threads(n)
    try:
        yield
    finally:
        if previous is not None:
            blas.set_threads(previous)
        if previous_native is not None:
            ext.limit_threads(previous_native)


def describe() -> dict[str, str]:
    """What is in use, in words (for `dh-mlx info` and benchmark records)."""
    import mlx.core as mx

    from .cpu import native, streams
    s = setup()
    on_cpu = mx.default_device() == mx.cpu
    ext = native.load() if on_cpu else None
    weights = (f"{ext.isa()} (of {', '.join(ext.isas())}), {ext.threads()} threads" if ext is not None
               else "not used" if not on_cpu else "unavailable (the native kernels are not loaded)")
    return {"cpu": cpu_description(), "blas": blas.loaded, "cpu_kernels": jit.status,
            "native_kernels": native.status if on_cpu else "not used on the GPU", "weight_kernels": weights,
            "operations": ", ".join(s.replaced) or "reference (DH_MLX_BACKEND=off or not on the CPU)",
            "eval_order_width": streams.eval_order_width()}


def cpu_description() -> str:
    """The CPU, e.g. 'AMD EPYC (AuthenticAMD), 2 cores' (the BLAS choice depends on the vendor)."""
    name = blas.cpuinfo("model name") or platform.processor() or platform.machine()
    vendor = blas.cpu_vendor()
    return f"{name}{f' ({vendor})' if vendor else ''}, {os.cpu_count()} cores"


def untuned_environ() -> dict[str, str]:
    """This process's environment for a child process that runs MLX without dh-mlx's CPU tuning (OpenBLAS
    without the shim, MLX's compiler flags and evaluation order): the baseline benchmarks run mlx-lm on."""
    from .cpu.streams import MLX_DEFAULT_BFS_WIDTH
    return dict(jit.system_environ(), DH_MLX_BLAS="openblas", DH_MLX_BLAS_SHIM="off", DH_MLX_JIT="off",
                MLX_BFS_MAX_WIDTH=MLX_DEFAULT_BFS_WIDTH)
