"""Native CPU kernels: an MLX extension (C++ primitive + nanobind), built once and cached.

`kernels.cpp`: the routed experts' segment matmuls (one BLAS call per expert's run of rows, the run
boundaries read when the kernel runs: no host sync, static shapes, works under mx.compile), a one-pass
softmax cross-entropy, and one-node linear, rotary embedding, RMS norm, router, MLA latent attention and
routed experts for decode-sized inputs, which cut a decode step's graph. Built with the C++ compiler that
`mx.compile` on the CPU already needs, against the installed MLX headers and nanobind (whose internals must
match the ones MLX was built with; the `cpu` extra pins a matching release), once per machine, when
`backend.setup()` first runs. `load()` returns None, with the reason in `status`, when the build or the
self-test fails, and callers fall back to pure MLX (`usable` / `usable_small` say whether given arrays can use
them). `DH_MLX_NATIVE=off` disables it.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from .. import blas
from ..blas import cache_dir

_DIR = Path(__file__).parent
_SOURCES = ("kernels.cpp", "quantized.cpp", "isa_generic.cpp", "isa_avx2.cpp", "isa_avx512.cpp")
_HEADERS = ("common.h", "pool.h", "quantized.h")
#: Why the extension is (not) in use.
status: str = "not attempted"
_module: ModuleType | None = None


#: Rows (size / last axis) up to which `usable_small` lets the one-node decode kernels replace MLX's ops:
#: they cut the per-node cost of decode-sized steps; training and prefill (compute-bound) keep MLX's kernels.
SMALL_ROWS = 64


def usable(*arrays) -> ModuleType | None:
    """The kernels when the default device is the CPU and every array is float32, else None (pure MLX)."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu or any(a.dtype != mx.float32 for a in arrays):
        return None
    return load()


def usable_small(x, *others) -> ModuleType | None:
    """`usable(x, *others)` when `x` has at most SMALL_ROWS rows, else None."""
    return usable(x, *others) if x.size <= SMALL_ROWS * x.shape[-1] else None


def loaded() -> ModuleType | None:
    """The extension if `load()` has already succeeded (never builds)."""
    return _module


def load() -> ModuleType | None:
    """The built extension module (`segment_rows`, `segment_outer`, `ce_forward`, `ce_backward`, `linear`,
    `rope`, `rms_norm`, `route`, `mla_absorbed`, the weight kernels), or None (see `status`)."""
    global status, _module
    if status != "not attempted":
        return _module
    if os.environ.get("DH_MLX_NATIVE", "").strip().lower() in ("off", "0", "none"):
        status = "disabled by DH_MLX_NATIVE"
        return None
    try:
        _module = _import(_build())
        _self_test(_module)
        _module.set_blas_threading(blas.local_threads_function())  # small products on one thread (common.h)
        status = f"loaded {_module.__file__}"
    except Exception as e:  # no compiler, headers or matching nanobind: pure MLX paths instead
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or [""]
        _module, status = None, f"unavailable ({type(e).__name__}: {detail[-1][:300]})"
    return _module


def _build() -> Path:
    import mlx.core as mx
    import nanobind

    from .. import jit as _jit

    mlx_dir = Path(mx.__file__).parent  # not mlx.__path__[0]: a directory named mlx on sys.path can come first
    nb_dir = Path(nanobind.__path__[0])
    flags = _jit.FLAGS if sys.platform.startswith("linux") else ()  # -march=native: keyed by the CPU below
    source = b"".join((_DIR / f).read_bytes() for f in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(source + repr((mx.__version__, nanobind.__version__, sys.version, flags,
                                                      _jit._cpu_features())).encode())
    out = cache_dir() / f"native-{key.hexdigest()[:16]}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [os.environ.get("CXX", "g++" if sys.platform.startswith("linux") else "c++"), "-std=c++20", "-O3", *flags,
           "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-DNB_DOMAIN=mlx",  # MLX's nanobind domain
           f"-I{mlx_dir / 'include'}", f"-I{nb_dir / 'include'}", f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}",
           f"-I{sysconfig.get_paths()['include']}", *(str(_DIR / f) for f in _SOURCES), str(nb_dir / "src" / "nb_combined.cpp"),
           f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}", "-o", str(tmp)]
    if sys.platform == "darwin":  # Python's symbols come from the interpreter at load time
        cmd[1:1] = ["-undefined", "dynamic_lookup"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    os.replace(tmp, out)
    return out


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader("_dh_native", str(path))
    spec = importlib.util.spec_from_file_location("_dh_native", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _self_test(module: ModuleType) -> None:
    """Two experts, one empty, against plain matmuls (raises on a mismatch or an interop failure, e.g. a
    nanobind whose internals differ from MLX's: the arrays then do not convert)."""
    import mlx.core as mx

    x = mx.arange(12, dtype=mx.float32).reshape(4, 3)
    w = mx.arange(18, dtype=mx.float32).reshape(3, 2, 3) / 10
    offsets = mx.array([0, 1, 1, 4], mx.int32)
    y = module.segment_rows(x, w, offsets, True)
    want = mx.concatenate([x[:1] @ w[0].T, x[1:] @ w[2].T])
    if not mx.allclose(y, want, rtol=1e-5, atol=1e-6).item():  # BLAS kernels may sum in another order
        raise RuntimeError("native self-test: segment_rows gave wrong values")
