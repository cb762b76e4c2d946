"""The CPU kernel flags (dh_mlx/backend/cpu/jit.py) and the compiled CPU attention they make fast (attention.attend):
compiled kernels must equal MLX's own ops, and `attend` must equal mx.fast's attention in values and
gradients for every mask kind and shape, one compiled graph serving them all."""

import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from dh_mlx.backend.cpu import jit as _jit
from dh_mlx.backend.cpu.attention import attend

active = pytest.mark.skipif(not _jit.status.startswith("/"), reason=f"kernel flags not in use ({_jit.status})")


@active
def test_compiled_kernels_are_built_with_our_flags_in_our_cache():
    wrapper = Path(_jit.status).parent / "bin" / "g++"
    assert all(flag in wrapper.read_text() for flag in _jit.FLAGS)
    assert os.environ["PATH"].split(os.pathsep)[0] == str(wrapper.parent)
    assert tempfile.gettempdir() != _jit.status  # Python's temp files stay in the system temp dir
    x = mx.array(np.linspace(-80, 80, 10007, dtype=np.float32))
    fused = mx.compile(lambda x: nn.silu(x) * 0.5 + mx.exp(-x * x / 7.0))(x)
    np.testing.assert_allclose(np.array(fused), np.array(nn.silu(x) * 0.5 + mx.exp(-x * x / 7.0)), rtol=2e-6,
                               atol=1e-30)
    assert any(Path(_jit.status).rglob("*.so"))  # MLX built that kernel into our cache


def masks(B, L, S, rng):
    causal = None if L > S else "causal"
    return {"causal": causal, "none": None, "bool": mx.array((rng.random((B, 1, L, S)) > 0.3) | (np.arange(S) == 0)),
            "bias": mx.array(rng.standard_normal((B, 1, L, S), dtype=np.float32)),
            "bool_2d": mx.array(np.arange(L)[:, None] + S - L >= np.arange(S)[None])}


@pytest.mark.parametrize("kind", ["causal", "none", "bool", "bias", "bool_2d"])
def test_attend_equals_fast_sdpa_in_values_and_gradients(kind):
    rng = np.random.default_rng(0)
    for B, H, L, S in [(2, 4, 24, 24), (1, 1, 5, 40), (1, 16, 1, 9), (3, 2, 7, 7), (1, 3, 2, 2)]:
        q, k = (mx.array(rng.standard_normal((B, H, n, 12), dtype=np.float32)) for n in (L, S))
        v = mx.array(rng.standard_normal((B, H, S, 8), dtype=np.float32))
        mask = masks(B, L, S, rng)[kind]

        def loss(f):
            return lambda q, k, v: (f(q, k, v) * mx.cos(mx.arange(8.0))).sum()
        ours = mx.value_and_grad(loss(lambda q, k, v: attend(q, k, v, 0.3, mask)), argnums=(0, 1, 2))(q, k, v)
        ref = mx.value_and_grad(loss(lambda q, k, v: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=0.3, mask=mask)), argnums=(0, 1, 2))(q, k, v)
        np.testing.assert_allclose(np.array(ours[0]), np.array(ref[0]), rtol=1e-5, atol=1e-5)
        for a, b in zip(ours[1], ref[1]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)
        assert np.abs(np.array(ours[1][1])).max() > 1e-3  # the key gradient is not trivially zero


@active
def test_a_child_process_can_turn_the_flags_off():
    import subprocess
    import sys
    code = ("import os, shutil, tempfile; from dh_mlx.backend.cpu import jit; jit.enable(); "
            "print(jit.status, shutil.which('g++'), os.environ.get('TMPDIR'), tempfile.gettempdir())")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DH_MLX_JIT="off"), capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:2] == ["MLX", "defaults"]
    assert "dh_mlx" not in out[-3] and tempfile.gettempdir() == out[-1]  # the real g++, the system temp dir
    assert os.environ.get("TMPDIR") == _jit.status  # this process keeps its own setting


def test_a_compiler_that_rejects_the_flags_leaves_mlx_untouched(tmp_path):
    import subprocess
    import sys
    fake = tmp_path / "bin" / "g++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")  # e.g. a g++ without -march=native for this CPU
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DH_MLX_JIT")}
    env.update(PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}", XDG_CACHE_HOME=str(tmp_path / "cache"))
    code = "import shutil; from dh_mlx.backend.cpu import jit; jit.enable(); print(jit.status); print(shutil.which('g++'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    status, gxx = out.stdout.strip().splitlines()
    assert status.startswith("MLX defaults") and "rejects" in status
    assert gxx == str(fake)  # no wrapper put in front of it
    assert not list((tmp_path / "cache").rglob("g++"))


@active
@pytest.mark.skipif(not shutil.which("objdump") or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs objdump on x86-64")
def test_a_many_input_kernel_with_sqrt_vectorises(tmp_path):
    """MLX's fused AdamW update: 11 pointer inputs, 3 outputs, a sqrt and a division per element. Without
    -fno-math-errno and a larger alias-check budget GCC keeps it scalar (vsqrtss, ~2.4 ns per element)."""
    src = tmp_path / "adamw.cpp"
    args = ", ".join(f"float* {c}" for c in "ABCDEFGHIJKLMNO")
    src.write_text("#include <cmath>\nextern \"C\" void update(" + args + ", size_t n) {\n"
                   "  for (size_t i = 0; i < n; ++i) {\n"
                   "    float g = G[i] * H[0], m = D[0] * E[i] + F[0] * g, v = I[0] * J[i] + K[0] * g * g;\n"
                   "    M[i] = m; N[i] = v; O[i] = A[i] * B[0] - C[0] * m / (std::sqrt(v) + L[0]);\n  }\n}\n")
    gxx = Path(_jit.status).parent / "bin" / "g++"  # the wrapper MLX calls
    subprocess.run([str(gxx), "-std=c++17", "-O3", "-fPIC", "-shared", str(src), "-o", str(tmp_path / "k.so")],
                   check=True)
    asm = subprocess.run(["objdump", "-d", str(tmp_path / "k.so")], capture_output=True, text=True).stdout
    assert "vsqrtps" in asm and "vdivps" in asm


STRIDED_KERNEL = """
#include <cmath>
#include <cstdint>
extern "C" {
void k_strided_2(int* shape, int64_t** strides, void** args) {
  float* A = (float*)args[0];
  const int64_t* A_strides = strides[1];
  float* B = (float*)args[1];
  const int64_t* B_strides = strides[2];
  float* C = (float*)args[2];
  for (int i0 = 0; i0 < shape[0]; ++i0) {
  for (int i1 = 0; i1 < shape[1]; ++i1) {
  float tmp_A = *A;
  float tmp_B = *B;
  float tmp_D = static_cast<float>(tmp_B);
  float tmp_E = tmp_A - tmp_D;
  float tmp_C = std::exp(tmp_E) * tmp_A;
  *C++ = tmp_C;
  A += A_strides[1];
  B += B_strides[1];
  }
  A += A_strides[0];
  A -= A_strides[1] * shape[1];
  B += B_strides[0];
  B -= B_strides[1] * shape[1];
  }
}
}
"""


def real_gxx() -> str:
    """The g++ behind our wrapper (which would pass any source through the rewrite); skips without one."""
    wrapper_dir = str(Path(_jit.status).parent / "bin") if _jit.status.startswith("/") else None
    gxx = shutil.which("g++", path=os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d != wrapper_dir))
    if gxx is None:
        pytest.skip("no g++ (mx.compile on the CPU cannot build kernels either)")
    return gxx


@pytest.mark.parametrize("strides", [((37, 1), (1, 0)), ((0, 1), (37, 1)), ((1, 0), (0, 0)), ((1, 37), (1, 0)),
                                     ((74, 2), (1, 0))])
def test_strided_kernel_rewrite_is_bit_identical(tmp_path, strides):
    """`_kernel_vectorize` turns MLX's strided inner loop into unit/zero-stride copies (vectorised) and keeps
    the original for other strides: outputs must be bit-identical to the original source's for each."""
    import ctypes
    from dh_mlx.backend.cpu import kernel_vectorize as _kernel_vectorize
    new = _kernel_vectorize.specialise(STRIDED_KERNEL)
    assert new is not None and new.count("#pragma GCC ivdep") == 4  # 2 inputs: 4 stride combinations
    gxx = real_gxx()
    libs = []
    for name, src in (("orig", STRIDED_KERNEL), ("vec", new)):  # the real compiler: the wrapper would rewrite both
        (tmp_path / f"{name}.cpp").write_text(src)
        subprocess.run([gxx, "-std=c++17", "-O3", "-fPIC", "-shared", "-march=native", str(tmp_path / f"{name}.cpp"),
                        "-o", str(tmp_path / f"{name}.so")], check=True)
        libs.append(ctypes.CDLL(str(tmp_path / f"{name}.so")))
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(74 * 37).astype(np.float32) for _ in range(2))
    shape = (ctypes.c_int * 2)(5, 37)
    outs = []
    for lib in libs:
        c = np.full(5 * 37, np.nan, np.float32)
        st = [(ctypes.c_int64 * 2)(*s) for s in strides]
        ptrs = (ctypes.POINTER(ctypes.c_int64) * 3)(None, ctypes.cast(st[0], ctypes.POINTER(ctypes.c_int64)),
                                                   ctypes.cast(st[1], ctypes.POINTER(ctypes.c_int64)))
        args = (ctypes.c_void_p * 3)(a.ctypes.data, b.ctypes.data, c.ctypes.data)
        lib.k_strided_2(shape, ptrs, args)
        outs.append(c)
    assert np.isfinite(outs[0]).all()
    np.testing.assert_array_equal(outs[0], outs[1])


def test_a_rewrite_the_compiler_rejects_falls_back_to_mlx_source(tmp_path):
    """The wrapper must never break a kernel build: if the rewritten source fails, MLX's own is compiled."""
    import sys
    from dh_mlx.backend.cpu import kernel_vectorize as _kernel_vectorize
    (tmp_path / "k.cpp").write_text(STRIDED_KERNEL)
    fake = tmp_path / "cc"  # rejects any rewritten file, builds the rest with the real compiler
    gxx = real_gxx()
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do case "$a" in *.vec*) exit 3;; esac; done\nexec "{gxx}" "$@"\n')
    fake.chmod(0o755)
    rc = subprocess.run([sys.executable, _kernel_vectorize.__file__, str(fake), "-O2", "-fPIC", "-shared",
                         str(tmp_path / "k.cpp"), "-o", str(tmp_path / "k.so")]).returncode
    assert rc == 0 and (tmp_path / "k.so").is_file()
    assert not list(tmp_path.glob("*.vec*"))  # the rewritten file is removed
