"""Load an optimised BLAS before `mlx.core` on Linux.

The `mlx[cpu]` wheel links the reference BLAS (~2-3 GFLOP/s for float32 matmul on this kind of machine).
Loading OpenBLAS or BLIS with RTLD_GLOBAL *before* MLX is imported lets the dynamic linker resolve MLX's
`cblas_*`/`sgemm_` symbols to the fast library (20-50x faster). Set `DH_MLX_BLAS=off` to keep the
reference BLAS, or `DH_MLX_BLAS=/path/to/lib.so` to choose one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "libopenblas.so.0",
    "libopenblas.so",
    "libblis.so.4",
    "libblis.so",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libblis.so.4",
)

#: Path or soname of the BLAS we loaded, or a note saying why none was.
loaded: str = "not attempted"


def load_fast_blas() -> str:
    """Load the first optimised BLAS found; returns what was loaded (idempotent, no-op off Linux)."""
    global loaded
    if loaded != "not attempted":
        return loaded
    choice = os.environ.get("DH_MLX_BLAS", "").strip()
    if not sys.platform.startswith("linux"):
        loaded = "platform default (not Linux)"
    elif choice.lower() in ("off", "0", "none", "reference"):
        loaded = "reference (disabled by DH_MLX_BLAS)"
    elif "mlx.core" in sys.modules:
        loaded = "reference (mlx.core was imported before dh_mlx)"
    else:
        names = (choice,) if choice else _CANDIDATES + tuple(
            n for n in (ctypes.util.find_library("openblas"), ctypes.util.find_library("blis")) if n
        )
        loaded = "reference (no OpenBLAS/BLIS found; apt-get install libopenblas0-pthread)"
        for name in names:
            try:
                ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = name
            break
    return loaded
