/* dh-mlx BLAS shim: MLX's CPU backend calls only cblas_sgemm, also for matrix-vector products (decode). Some
 * BLAS builds (OpenBLAS 0.3.21, Debian 12) pack the whole matrix in sgemm even when one operand is a single
 * row, which makes a decode step's weight reads slower than sgemv. This library is loaded before the BLAS
 * (see dh_mlx/backend/cpu/blas.py), so MLX's cblas_sgemm resolves here: products with at most GEMV_ROWS rows (or
 * columns) become that many sgemv calls; everything else goes to the real sgemm unchanged. */
#include <stddef.h>

enum { RowMajor = 101, ColMajor = 102, NoTrans = 111, Trans = 112 };
enum { GEMV_ROWS = 3 }; /* one sgemv per row beats sgemm up to this many rows (BENCHMARKS.md, blas) */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);
static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
long dh_gemv_calls; /* how many products took the sgemv route (read by tests) */

void dh_blas_init(void *sgemm, void *sgemv) {
  real_sgemm = (sgemm_fn)sgemm;
  real_sgemv = (sgemv_fn)sgemv;
}

/* y (n) = alpha * op(W) x + beta * y, W stored row-major as rows x cols; beta == 0 never reads y. */
static void gemv(int trans, int rows, int cols, float alpha, const float *W, int ldw, const float *x, int incx,
                 float beta, float *y, int incy) {
  if (beta == 0.0f) { /* sgemv scales y by beta first, and 0 * uninitialised memory can be NaN */
    int n = trans == NoTrans ? rows : cols;
    for (int i = 0; i < n; i++) y[(size_t)i * incy] = 0.0f;
  }
  real_sgemv(RowMajor, trans, rows, cols, alpha, W, ldw, x, incx, beta, y, incy);
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
  if (order == ColMajor) { /* column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T */
    int t = ta; ta = tb; tb = t;
    t = M; M = N; N = t;
    t = lda; lda = ldb; ldb = t;
    const float *p = A; A = B; B = p;
  }
  if (K > 0 && M <= GEMV_ROWS) { /* row i of C (N) = op(B)^T (row i of op(A)) */
    dh_gemv_calls++;
    for (int i = 0; i < M; i++) {
      const float *a = ta == NoTrans ? A + (size_t)i * lda : A + i;
      int inca = ta == NoTrans ? 1 : lda;
      if (tb == NoTrans) gemv(Trans, K, N, alpha, B, ldb, a, inca, beta, C + (size_t)i * ldc, 1);
      else gemv(NoTrans, N, K, alpha, B, ldb, a, inca, beta, C + (size_t)i * ldc, 1);
    }
    return;
  }
  if (K > 0 && N <= GEMV_ROWS) { /* column j of C (M) = op(A) (column j of op(B)) */
    dh_gemv_calls++;
    for (int j = 0; j < N; j++) {
      const float *b = tb == NoTrans ? B + j : B + (size_t)j * ldb;
      int incb = tb == NoTrans ? ldb : 1;
      if (ta == NoTrans) gemv(NoTrans, M, K, alpha, A, lda, b, incb, beta, C + j, ldc);
      else gemv(Trans, K, M, alpha, A, lda, b, incb, beta, C + j, ldc);
    }
    return;
  }
  real_sgemm(RowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
