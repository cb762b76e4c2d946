"""Device facts: compute dtype and memory, chosen at run time, never hard-coded."""

from __future__ import annotations

import os
import sys

import mlx.core as mx

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
