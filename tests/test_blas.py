"""The BLAS loader and its matrix-vector shim (dh_mlx/backend/cpu/blas_shim.c): every product it reroutes to sgemv must
equal a float64 reference, whatever the operand layout, alpha/beta, or the garbage in the output buffer."""

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx.backend.cpu import blas as _blas

needs_shim = pytest.mark.skipif(_blas.shim is None,
                                reason=f"no matrix-vector shim in front of {_blas.loaded} (see the last test)")


def calls() -> int:
    return ctypes.c_long.in_dll(_blas.shim, "dh_gemv_calls").value


def check(a: np.ndarray, b: np.ndarray, mlx_a: mx.array, mlx_b: mx.array, rerouted: bool) -> None:
    before = calls()
    out = mlx_a @ mlx_b
    mx.eval(out)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-5, atol=1e-4)
    assert (calls() > before) == rerouted


@needs_shim
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8])
def test_row_products_match_numpy(rows):
    rng = np.random.default_rng(rows)
    a = rng.standard_normal((rows, 300), dtype=np.float32)
    w = rng.standard_normal((700, 300), dtype=np.float32)  # stored [out, in], used transposed: x @ w.T
    check(a, w.T, mx.array(a), mx.array(w).T, rerouted=rows <= 3)
    check(a, w.T, mx.array(a), mx.array(np.ascontiguousarray(w.T)), rerouted=rows <= 3)  # plain [in, out]
    at = np.ascontiguousarray(a.T)  # a transposed view as the left operand
    check(a, w.T, mx.array(at).T, mx.array(w).T, rerouted=rows <= 3)


@needs_shim
@pytest.mark.parametrize("cols", [1, 2, 3])
def test_column_products_match_numpy(cols):
    rng = np.random.default_rng(10 + cols)
    w = rng.standard_normal((500, 260), dtype=np.float32)
    x = rng.standard_normal((260, cols), dtype=np.float32)
    check(w, x, mx.array(w), mx.array(x), rerouted=True)
    check(w, x, mx.array(np.ascontiguousarray(w.T)).T, mx.array(np.ascontiguousarray(x.T)).T, rerouted=True)


@needs_shim
def test_addmm_alpha_beta_and_gathered_experts():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((1, 64), dtype=np.float32)
    a = rng.standard_normal((1, 32), dtype=np.float32)
    b = rng.standard_normal((32, 64), dtype=np.float32)
    out = mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=2.0)
    np.testing.assert_allclose(np.array(out), 0.5 * a @ b + 2.0 * c, rtol=1e-5, atol=1e-5)
    # decode's expert path: gather_mm of one token against 6 of 64 stacked experts
    experts = rng.standard_normal((64, 48, 32), dtype=np.float32)
    idx = np.array([[3, 9, 17, 40, 41, 63]])
    before = calls()
    y = mx.gather_mm(mx.array(a).reshape(1, 1, 1, 32), mx.array(experts).swapaxes(-1, -2), rhs_indices=mx.array(idx))
    np.testing.assert_allclose(np.array(y).reshape(6, 48), experts[idx[0]] @ a[0], rtol=1e-5, atol=1e-4)
    assert calls() >= before + 6


@needs_shim
def test_uninitialised_output_never_leaks_nan():
    """beta = 0 must not read the output buffer: reuse freed NaN-filled memory for the result."""
    rng = np.random.default_rng(1)
    a, w = rng.standard_normal((1, 256), dtype=np.float32), rng.standard_normal((256, 1024), dtype=np.float32)
    ma, mw = mx.array(a), mx.array(w)
    for _ in range(5):
        junk = mx.full((1, 1024), float("nan"))
        mx.eval(junk)
        del junk  # its buffer goes back to MLX's cache, the next (1, 1024) result may get it
        out = ma @ mw
        mx.eval(out)
        assert np.isfinite(np.array(out)).all()


def test_loader_reports_what_it_loaded():
    assert _blas.loaded != "not attempted"
    assert ("matrix-vector shim" in _blas.loaded) == (_blas.shim is not None)
    if "openblas" in _blas.loaded and shutil.which(os.environ.get("CC", "cc")):
        assert _blas.shim is not None, "OpenBLAS and a C compiler are here, so the shim should have loaded"


def test_first_choice_follows_the_cpu_vendor():
    """MKL first on Intel (or an unknown vendor), the system's OpenBLAS/BLIS first elsewhere (AMD)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the mkl wheel is not installed")
    if os.environ.get("DH_MLX_BLAS"):
        pytest.skip("DH_MLX_BLAS chooses the BLAS")
    intel, amd = list(_blas._candidates("", "GenuineIntel")), list(_blas._candidates("", "AuthenticAMD"))
    assert "libmkl_rt" in intel[0] and "libmkl_rt" in amd[-1] and "libmkl_rt" not in " ".join(amd[:-1])
    assert sorted(intel) == sorted(amd)
    assert list(_blas._candidates("", "")) == intel
    assert not any("libmkl_rt" in n for n in _blas._candidates("openblas", "GenuineIntel"))
    assert all("libmkl_rt" in n for n in _blas._candidates("mkl", "AuthenticAMD"))
    assert list(_blas._candidates(" /x/libfoo.so ", "AuthenticAMD")) == ["/x/libfoo.so"]
    if _blas.cpu_vendor() in ("GenuineIntel", ""):
        assert "libmkl_rt" in _blas.loaded and _blas.shim is None  # MKL needs no matrix-vector shim
    elif ctypes.util.find_library("openblas") or ctypes.util.find_library("blis"):
        assert "libmkl_rt" not in _blas.loaded or "wrong cblas_sgemm results, skipped" in _blas.loaded
    rng = np.random.default_rng(2)
    a, w = rng.standard_normal((48, 1024), dtype=np.float32), rng.standard_normal((288, 1024), dtype=np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(w).T), a.astype(np.float64) @ w.T.astype(np.float64),
                               rtol=1e-4, atol=1e-3)


WRONG_SGEMM = r"""
/* A cblas_sgemm that is off by one in one element (a BLAS with a broken kernel for this CPU). */
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            float s = 0;
            for (int p = 0; p < k; p++)
                s += a[i * lda + p] * (tb == 112 ? b[j * ldb + p] : b[p * ldb + j]);
            c[i * ldc + j] = alpha * s + (beta != 0 ? beta * c[i * ldc + j] : 0) + (i == 5 && j == 7);
        }
}
"""


def test_a_blas_with_wrong_sgemm_results_is_skipped(tmp_path):
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler")
    src, lib = tmp_path / "wrong.c", tmp_path / "libwrong.so"
    src.write_text(WRONG_SGEMM)
    subprocess.run([cc, "-O1", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    assert not _blas.sgemm_is_exact(ctypes.CDLL(str(lib)))
    assert _blas._lib is None or _blas.sgemm_is_exact(_blas._lib)  # the one loaded here passes
    src.write_text(WRONG_SGEMM.replace("+ (i == 5 && j == 7)", ""))  # the same code, right: accepted
    right = tmp_path / "libright.so"
    subprocess.run([cc, "-O1", "-shared", "-fPIC", str(src), "-o", str(right)], check=True)
    assert _blas.sgemm_is_exact(ctypes.CDLL(str(right)))
    code = "from dh_mlx.backend.cpu import blas; print(blas.loaded)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DH_MLX_BLAS=str(lib)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"reference ({lib}: wrong cblas_sgemm results, skipped)"
    # the loader goes on to the next library and says which one it skipped (a fresh copy of the module)
    code = (f"import importlib.util as u; s = u.spec_from_file_location('b', {_blas.__file__!r}); "
            f"b = u.module_from_spec(s); s.loader.exec_module(b); "
            f"b._candidates = lambda c, v: iter([{str(lib)!r}, {str(right)!r}]); print(b.load_fast_blas())")
    env = {k: v for k, v in os.environ.items() if k != "DH_MLX_BLAS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"{right} ({lib}: wrong cblas_sgemm results, skipped)"


@pytest.mark.slow
@pytest.mark.skipif(_blas.shim is not None or not ctypes.util.find_library("openblas"),
                    reason="the shim tests above run in this process, or there is no OpenBLAS to put it in front of")
def test_shim_tests_pass_in_front_of_openblas():
    """With MKL loaded here the shim is not used; run this file again in a process that loads OpenBLAS."""
    env = dict(os.environ, DH_MLX_BLAS="openblas")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not first_choice and not in_front"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_blas_threads_sets_the_count_inside_the_block_and_restores_it():
    from dh_mlx.backend.cpu import blas as _blas
    from dh_mlx.backend import blas_threads
    before = _blas.set_threads(2)
    if before is None:
        pytest.skip(f"no thread setting in {_blas.loaded}")
    try:
        with blas_threads(1):
            assert _blas.set_threads(1) == 1
        assert _blas.set_threads(2) == 2
        with blas_threads(None):  # leaves it alone
            assert _blas.set_threads(2) == 2
    finally:
        _blas.set_threads(before)


def test_with_mkl_the_native_kernels_get_its_per_thread_thread_count():
    """The decode kernels run small products on one BLAS thread (native/common.h, SmallBlas): they need MKL's
    MKL_Set_Num_Threads_Local, which sets the calling thread's count and returns the previous one."""
    address = _blas.local_threads_function()
    if "mkl" not in _blas.loaded:
        assert address == 0
        return
    set_local = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(address)
    assert set_local(1) == 0  # 0: this thread followed the global setting
    assert set_local(0) == 1
