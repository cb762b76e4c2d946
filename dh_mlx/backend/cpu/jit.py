"""Let `mx.compile`'s CPU kernels use the machine's vector units (Linux).

On the CPU backend MLX compiles each fused elementwise kernel at run time with `g++ -std=c++17 -O3 -fPIC
-shared` (the first `g++` on PATH) and caches the library under `$TMPDIR/mlx/<version>/cpu`. On x86 its SIMD
type is one lane wide, so without target flags GCC calls libm's `fmaf` six times per element and leaves
MLX's exp polynomial out of line. With `-march=native`, a larger inlining budget and `-fno-trapping-math`
(which lets GCC vectorise the polynomial's selects; no IEEE result changes) the same source vectorises.
Kernels with many inputs stay scalar without two more: `-fno-math-errno` (a vector sqrt; results unchanged,
only errno is not set) and a larger alias-check budget (MLX passes each input as a plain pointer; the fused
AdamW update has 14). BENCHMARKS.md has the figures.

`enable()` puts a `g++` wrapper that adds those flags first on PATH and points MLX's kernel cache at a
directory of ours (named by the flags and the CPU's feature set, so kernels built without them, or for
another CPU, are never reused). Python's own temporary directory is pinned to the system one first, and
child processes that set dh_mlx up do the same, so only MLX's kernel cache moves. Set `DH_MLX_JIT=off` to
leave MLX's compiler untouched. Must run before MLX compiles its first kernel.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .blas import cache_dir, cpuinfo

FLAGS = ("-march=native", "-fno-trapping-math", "-fno-math-errno", "--param", "vect-max-version-for-alias-checks=200",
         "--param", "max-inline-insns-single=2000", "--param", "max-inline-insns-auto=2000")
_VECTORIZE = Path(__file__).with_name("kernel_vectorize.py")  # rewrites strided loops (see there)
_SYSTEM_TMPDIR = "DH_MLX_SYSTEM_TMPDIR"  # the temp dir Python programs in this process tree should use
_WRAPPER_DIR = "DH_MLX_JIT_BIN"  # the wrapper directory a parent process put on PATH

#: Where MLX's compiled CPU kernels go, or a note saying why the flags are not in use.
status: str = "not attempted"


def _cpu_features() -> str:
    return cpuinfo("flags") or cpuinfo("Features")  # x86 / Arm


def enable() -> str:
    """Install the compiler wrapper and kernel cache (idempotent; no-op off Linux or without g++)."""
    global status
    if status != "not attempted":
        return status
    # Keep Python's temp files where they were, whatever we do to TMPDIR below (and in parent processes).
    system_tmp = os.environ.get(_SYSTEM_TMPDIR)
    if system_tmp:
        os.environ["TMPDIR"] = system_tmp
    tempfile.tempdir = None  # recomputed from the restored environment
    tempfile.tempdir = tempfile.gettempdir()
    inherited = os.environ.pop(_WRAPPER_DIR, None)  # so that DH_MLX_JIT=off in a child really is off
    if inherited:
        os.environ["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d != inherited)
    real = shutil.which("g++")
    if os.environ.get("DH_MLX_JIT", "").strip().lower() in ("off", "0", "none"):
        status = "MLX defaults (disabled by DH_MLX_JIT)"
    elif not sys.platform.startswith("linux"):
        status = "MLX defaults (not Linux)"
    elif real is None:
        status = "MLX defaults (no g++ on PATH: mx.compile cannot build CPU kernels)"
    else:
        key = hashlib.sha256(repr((FLAGS, real, _cpu_features(), sys.executable, str(_VECTORIZE),
                                   _VECTORIZE.read_bytes())).encode()).hexdigest()[:16]
        root = cache_dir() / f"jit-{key}"
        try:
            if not (root / "bin" / "g++").exists() and not _flags_work(real):
                status = f"MLX defaults ({real} rejects {' '.join(FLAGS)})"
                return status
            _write_wrapper(root / "bin" / "g++", real)
            (root / "tmp").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            status = f"MLX defaults (cannot write {root}: {e})"
            return status
        os.environ[_SYSTEM_TMPDIR] = tempfile.tempdir
        os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        os.environ[_WRAPPER_DIR] = str(root / "bin")
        os.environ["TMPDIR"] = str(root / "tmp")
        status = str(root / "tmp")
    return status


def system_environ() -> dict[str, str]:
    """This process's environment without what `enable()` (here or in a parent) exported: the system's
    TMPDIR and a PATH without the compiler wrapper."""
    env = dict(os.environ)
    wrapper = env.pop(_WRAPPER_DIR, None)
    system_tmp = env.pop(_SYSTEM_TMPDIR, None)
    if wrapper:
        env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep) if d != wrapper)
    if system_tmp:
        env["TMPDIR"] = system_tmp
    return env


def _flags_work(real: str) -> bool:
    """Whether `real` builds a shared library with FLAGS (checked once, before the wrapper is first written)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text('extern "C" float probe(const float* x, int n) { float s = 0; '
                       'for (int i = 0; i < n; ++i) s += x[i]; return s; }\n')
        try:
            out = subprocess.run([real, "-std=c++17", "-O3", "-fPIC", "-shared", *FLAGS, str(src), "-o",
                                  str(Path(d) / "probe.so")], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.returncode == 0


def _write_wrapper(path: Path, real: str) -> None:
    """`g++ ARGS` -> the real compiler with FLAGS, MLX's source first through `kernel_vectorize.py`."""
    script = "#!/bin/sh\nexec " + " ".join([f'"{sys.executable}"', f'"{_VECTORIZE}"', f'"{real}"', *FLAGS,
                                            '"$@"']) + "\n"
    if path.exists() and path.read_text() == script:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(script)
    tmp.chmod(0o755)
    os.replace(tmp, path)
