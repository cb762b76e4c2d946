"""Load an optimised BLAS before `mlx.core` on Linux.

The `mlx[cpu]` wheel links the reference BLAS (~2-3 GFLOP/s for float32 matmul on this kind of machine).
Loading a fast one with RTLD_GLOBAL *before* MLX is imported lets the dynamic linker resolve MLX's
`cblas_*`/`sgemm_` symbols to it (20-50x faster). First choice: Intel MKL from the `mkl` wheel (the `cpu`
extra on x86-64 Linux), whose small products (prefill's ~50-row expert matmuls, attention's per-head blocks)
run 1.4-1.75x faster than OpenBLAS 0.3.21's; then OpenBLAS or BLIS from the system. `DH_MLX_BLAS` chooses:
`off` (the reference BLAS), `mkl`, `openblas` (OpenBLAS/BLIS only) or a library path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

_SYSTEM = (
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
#: The loaded matrix-vector shim (its `dh_gemv_calls` counts the products it rerouted), or None.
shim: ctypes.CDLL | None = None
_lib: ctypes.CDLL | None = None  # the BLAS we loaded

# (set, get) thread-count functions of the BLAS libraries we may load
_THREAD_FUNCTIONS = (("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
                     ("openblas_set_num_threads", "openblas_get_num_threads"),
                     ("bli_thread_set_num_threads", "bli_thread_get_num_threads"))


def load_fast_blas() -> str:
    """Load the first optimised BLAS found; returns what was loaded (idempotent, no-op off Linux)."""
    global loaded, _lib
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
        mode = choice.lower()
        if mode in ("", "mkl", "openblas"):  # _mkl() loads MKL's OpenMP runtime: only when MKL may be chosen
            names = (_mkl() if mode != "openblas" else ()) + (_system() if mode != "mkl" else ())
        else:
            names = (choice,)
        loaded = "reference (no MKL/OpenBLAS/BLIS found; pip install mkl or apt-get install libopenblas0-pthread)"
        for name in names:
            try:
                blas = ctypes.CDLL(name)  # local first: the shim, if any, must enter the global scope before it
            except OSError:
                continue
            if "mkl" not in Path(name).name:  # MKL's sgemm handles one-row products itself
                _load_gemv_shim(blas)
            _lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            loaded = name + (" + matrix-vector shim" if shim is not None else "")
            break
    return loaded


def set_threads(n: int) -> int | None:
    """Set how many threads the loaded BLAS uses for each call (process-wide); returns the previous count, or
    None (and changes nothing) when no BLAS of ours is loaded or it has no such setting."""
    for set_name, get_name in _THREAD_FUNCTIONS:
        try:
            set_, get = getattr(_lib, set_name), getattr(_lib, get_name)
        except AttributeError:  # also when _lib is None
            continue
        get.restype = ctypes.c_int
        previous = get()
        set_(ctypes.c_int(n))
        return previous
    return None


def _system() -> tuple[str, ...]:
    """OpenBLAS/BLIS sonames and paths to try, the loader's own finds last."""
    found = (ctypes.util.find_library("openblas"), ctypes.util.find_library("blis"))
    return _SYSTEM + tuple(n for n in found if n)


def _mkl() -> tuple[str, ...]:
    """libmkl_rt from the `mkl` wheel, after loading the OpenMP runtime it threads with (the `intel-openmp`
    wheel): both live in the environment's lib/, which is not on the loader's path in a virtualenv."""
    def wheel_library(dist: str, prefix: str) -> str | None:
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        found = sorted(str(Path(f.locate()).resolve()) for f in files if Path(f).name.startswith(prefix))
        return found[0] if found else None

    mkl = wheel_library("mkl", "libmkl_rt.so")
    if mkl is None:
        return ()
    omp = wheel_library("intel-openmp", "libiomp5.so")
    try:
        if omp:
            ctypes.CDLL(omp, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return ()
    return (mkl,)


def _load_gemv_shim(blas: ctypes.CDLL) -> None:
    """Build (once, cached) and load `_blas_shim.c` globally, pointed at `blas`; sets `shim` when it worked.

    The shim sends MLX's matrix-vector `cblas_sgemm` calls to `cblas_sgemv` (~3x faster decode weight reads
    with OpenBLAS 0.3.21). It needs a C compiler on first use, as `mx.compile` on the CPU backend does; without
    one, or with `DH_MLX_BLAS_SHIM=off`, MLX calls the BLAS directly.
    """
    global shim
    if os.environ.get("DH_MLX_BLAS_SHIM", "").strip().lower() in ("off", "0", "none"):
        return
    try:
        sgemm, sgemv = blas.cblas_sgemm, blas.cblas_sgemv
        lib = ctypes.CDLL(str(_build(Path(__file__).with_name("_blas_shim.c"))), mode=ctypes.RTLD_GLOBAL)
    except (AttributeError, OSError, subprocess.SubprocessError):
        return
    lib.dh_blas_init(ctypes.cast(sgemm, ctypes.c_void_p), ctypes.cast(sgemv, ctypes.c_void_p))
    shim = lib


def cache_dir() -> Path:
    """dh-mlx's per-user cache of built native code (the shim here, compiled kernels in _jit.py)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dh_mlx"


def _build(source: Path) -> Path:
    """Compile `source` into a shared library in the user cache, named by its hash (written atomically)."""
    code = source.read_bytes()
    cache = cache_dir()
    out = cache / f"blas_shim-{hashlib.sha256(code).hexdigest()[:16]}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", str(source), "-o", str(tmp)],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
    return out
