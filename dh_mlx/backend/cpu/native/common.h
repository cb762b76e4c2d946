// What the native kernels' source files share: MLX and nanobind, the BLAS entry points, the primitive base
// class and the view of an input a dispatched task captures.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cpu/unary_ops.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
extern "C" void cblas_sgemv(int order, int trans, int m, int n, float alpha, const float* a, int lda, const float* x,
                            int incx, float beta, float* y, int incy);

namespace dhn {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// What every kernel here shares: CPU only, and outputs allocated before the work is dispatched.
class CpuPrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only");
  }

 protected:
  static void allocate(std::vector<mx::array>& outputs) {
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  }
};

inline float exp_(float x) { return mx::detail::Exp{}(x); }

// Decode-sized products run on the calling thread: waking MKL's OpenMP workers for them costs more than they
// compute. `blas_local_threads` is MKL's MKL_Set_Num_Threads_Local (thread-local, returns the previous
// setting) when MKL is the BLAS, set once at load (set_blas_threading); null otherwise (OpenBLAS decides itself).
// Up to kSmallBlasWork multiply-adds a product runs on one thread (BENCHMARKS.md, serve).
inline int (*blas_local_threads)(int) = nullptr;
constexpr double kSmallBlasWork = 1 << 21;

// f(0) .. f(parts - 1) shared over the weight kernels' thread pool when `work` (multiply-adds) pays for the
// hand-off, else in order on this thread (quantized.cpp). A part must not depend on another's result.
void parallel_for(int parts, size_t work, const std::function<void(int)>& f);

// One BLAS thread for the scope when every product in it does at most `work` multiply-adds.
struct SmallBlas {
  int previous = -1;
  explicit SmallBlas(double work) {
    if (blas_local_threads && work <= kSmallBlasWork) previous = blas_local_threads(1);
  }
  ~SmallBlas() {
    if (previous >= 0) blas_local_threads(previous);
  }
  SmallBlas(const SmallBlas&) = delete;
  SmallBlas& operator=(const SmallBlas&) = delete;
};

// What a kernel needs of an input, taken when the primitive is scheduled (eval_cpu runs on the thread that
// calls eval; the task it dispatches runs later on the stream's thread). A task must capture everything it
// uses by value, never `this`: the scheduling thread may release the primitive before the task runs.
template <typename T>
struct View {
  const T* data;
  bool row_contiguous;
  mx::Shape shape;
  mx::Strides strides;
  size_t size;
  explicit View(const mx::array& a)
      : data(a.data<T>()), row_contiguous(a.flags().row_contiguous), shape(a.shape()), strides(a.strides()),
        size(a.size()) {}
  // Row-major data: the array's own when row-contiguous, else a copy into `scratch`.
  const T* dense(std::vector<T>& scratch) const {
    if (row_contiguous) return data;
    scratch.resize(size);
    const int nd = shape.size();
    std::vector<int64_t> idx(nd, 0);
    for (size_t i = 0; i < size; ++i) {
      int64_t off = 0;
      for (int d = 0; d < nd; ++d) off += idx[d] * strides[d];
      scratch[i] = data[off];
      for (int d = nd - 1; d >= 0; --d) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
    return scratch.data();
  }
};


// The quantized and half-precision weight kernels (quantized.cpp) add their functions to the module.
void register_quantized(nb::module_& m);

}  // namespace dhn
