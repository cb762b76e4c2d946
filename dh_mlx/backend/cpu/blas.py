"""Load an optimised BLAS before `mlx.core` on Linux.

The `mlx[cpu]` wheel links the reference BLAS, which is slow. Loading a fast one with RTLD_GLOBAL *before* MLX
is imported lets the dynamic linker resolve MLX's `cblas_*`/`sgemm_` symbols to it. The order depends on the
CPU's vendor. On Intel CPUs (and when the vendor is unknown) first Intel MKL from the `mkl` wheel (the `cpu`
extra on x86-64 Linux), whose small products (prefill's expert matmuls, attention's per-head blocks) beat
OpenBLAS's; then OpenBLAS or BLIS from the system. On other x86 CPUs (AMD) the system's OpenBLAS or BLIS first:
MKL does not take its fastest code paths on them. BENCHMARKS.md has the figures. A library whose `cblas_sgemm`
gets a small exact product wrong is skipped. `DH_MLX_BLAS` chooses: `off` (the reference BLAS), `mkl`, `openblas` (OpenBLAS/BLIS only) or a
library path.
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
from typing import Iterator

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
        loaded = "reference (no MKL/OpenBLAS/BLIS found; pip install mkl or apt-get install libopenblas0-pthread)"
        wrong = []
        for name in _candidates(choice, cpu_vendor()):
            try:
                blas = ctypes.CDLL(name)  # local first: the shim, if any, must enter the global scope before it
            except OSError:
                continue
            if not sgemm_is_exact(blas):
                wrong.append(name)
                continue
            if "mkl" not in Path(name).name:  # MKL's sgemm handles one-row products itself
                _load_gemv_shim(blas)
            _lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            loaded = name + (" + matrix-vector shim" if shim is not None else "")
            break
        if wrong:
            skipped = f"{', '.join(wrong)}: wrong cblas_sgemm results, skipped"
            loaded = f"{loaded} ({skipped})" if _lib is not None else f"reference ({skipped})"
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


def local_threads_function() -> int:
    """The address of MKL's `MKL_Set_Num_Threads_Local` (a per-thread thread count) when MKL is the loaded
    BLAS, else 0: the native decode kernels then run small products on their own thread (native/common.h)."""
    try:
        return ctypes.cast(_lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value or 0
    except AttributeError:  # also when _lib is None
        return 0


def cpuinfo(field: str) -> str:
    """A field of the first processor in /proc/cpuinfo ('vendor_id', 'model name'); '' where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The x86 CPU's vendor id ('GenuineIntel', 'AuthenticAMD', ...); '' where unknown."""
    return cpuinfo("vendor_id")


def _candidates(choice: str, vendor: str) -> Iterator[str]:
    """Libraries to try, in order, for a `DH_MLX_BLAS` value and a CPU vendor (lazily: looking MKL up loads
    its OpenMP runtime, so only when MKL's turn comes)."""
    mode = choice.strip().lower()
    if mode not in ("", "mkl", "openblas"):
        yield choice.strip()
        return
    sources = {"mkl": (_mkl,), "openblas": (_system,)}.get(mode) or \
        ((_mkl, _system) if vendor in ("GenuineIntel", "") else (_system, _mkl))
    for source in sources:
        yield from source()


def sgemm_is_exact(blas: ctypes.CDLL) -> bool:
    """Whether `blas`'s `cblas_sgemm` computes a small integer-valued product exactly, once as A @ B and once
    as A @ B^T (how MLX calls it for `x @ W.T`); sizes past a kernel block in every dimension."""
    import numpy as np

    try:
        sgemm = blas.cblas_sgemm
    except AttributeError:
        return False
    rng = np.random.default_rng(0)
    m, n, k = 37, 53, 71
    a = rng.integers(-3, 4, (m, k)).astype(np.float32)
    b = rng.integers(-3, 4, (k, n)).astype(np.float32)
    want = a.astype(np.int64) @ b.astype(np.int64)  # |entries| <= 9 k: exact in float32
    ptr = ctypes.POINTER(ctypes.c_float)
    f, i = ctypes.c_float, ctypes.c_int
    sgemm.restype = None
    for trans_b, right in ((111, b), (112, np.ascontiguousarray(b.T))):  # CblasNoTrans, CblasTrans
        c = np.full((m, n), np.nan, np.float32)
        sgemm(i(101), i(111), i(trans_b), i(m), i(n), i(k), f(1.0), a.ctypes.data_as(ptr), i(k),
              right.ctypes.data_as(ptr), i(right.shape[1]), f(0.0), c.ctypes.data_as(ptr), i(n))
        if not np.array_equal(c, want):
            return False
    return True


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
    # OpenMP's threads otherwise spin 200 ms after each parallel call; decode then runs cores hot that the native
    # weight kernels' own pool and other processes need (a 4-bit decode took twice the CPU time).
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        if omp:
            ctypes.CDLL(omp, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return ()
    return (mkl,)


def _load_gemv_shim(blas: ctypes.CDLL) -> None:
    """Build (once, cached) and load `blas_shim.c` globally, pointed at `blas`; sets `shim` when it worked.

    The shim sends MLX's matrix-vector `cblas_sgemm` calls to `cblas_sgemv`, which streams the weights that
    OpenBLAS's sgemm would pack first. It needs a C compiler on first use, as `mx.compile` on the CPU backend
    does; without one, or with `DH_MLX_BLAS_SHIM=off`, MLX calls the BLAS directly.
    """
    global shim
    if os.environ.get("DH_MLX_BLAS_SHIM", "").strip().lower() in ("off", "0", "none"):
        return
    try:
        sgemm, sgemv = blas.cblas_sgemm, blas.cblas_sgemv
        lib = ctypes.CDLL(str(_build(Path(__file__).with_name("blas_shim.c"))), mode=ctypes.RTLD_GLOBAL)
    except (AttributeError, OSError, subprocess.SubprocessError):
        return
    lib.dh_blas_init(ctypes.cast(sgemm, ctypes.c_void_p), ctypes.cast(sgemv, ctypes.c_void_p))
    shim = lib


def cache_dir() -> Path:
    """dh-mlx's per-user cache of built native code (the shim here, compiled kernels in jit.py)."""
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
