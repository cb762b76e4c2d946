// Native CPU kernels for dh-mlx, as MLX primitives (built at first use by dh_mlx/native/__init__.py).
//
// SegmentMatmul: routed experts, one BLAS call per expert over its run of rows. Rows sorted by expert are
// described by `offsets` (E + 1 int32: expert e owns rows offsets[e] to offsets[e + 1]), read when the kernel
// runs, so shapes never depend on the routing and the op works inside mx.compile without a host sync:
//   rows:  y[rows of e] = x[rows of e] @ W_e^T (transpose) or @ W_e     x (R, in), w (E, ., .) -> y (R, out)
//   outer: g[e] = a[rows of e]^T @ b[rows of e]                        a (R, P), b (R, Q)     -> g (E, P, Q)
// `outer` is the weight gradient of `rows`. Float32 only; rows outside every run come out zero.
//
// CrossEntropy: a vocabulary-sized softmax cross-entropy in one pass over the logits per direction:
//   forward:  logits (N, V), targets (N,) -> ce (N,), lse (N,)    (lse = log-sum-exp of each row)
//   backward: logits, targets, lse, g (N,) -> (exp(logits - lse) - onehot(targets)) * g
// A row (32 KB for V = 8192) stays in cache between its max and its sum of exponentials; MLX's own ops make
// ~7 passes over the (N, V) array. exp is MLX's polynomial, so values match its kernels to rounding.
#include <algorithm>
#include <cmath>
#include <cstring>
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

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

class SegmentMatmul : public mx::Primitive {
 public:
  SegmentMatmul(mx::Stream s, bool outer, bool transpose) : mx::Primitive(s), outer_(outer), transpose_(transpose) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &a = inputs[0], &b = inputs[1], &off = inputs[2];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const float* ap = a.data<float>();
    const float* bp = b.data<float>();
    const int32_t* op = off.data<int32_t>();
    float* yp = out.data<float>();
    const int E = off.shape(0) - 1, R = a.shape(0);
    auto& encoder = mx::cpu::get_command_encoder(stream());
    if (outer_) {
      const int P = a.shape(1), Q = b.shape(1);
      encoder.dispatch([=]() {
        for (int e = 0; e < E; ++e) {
          const int s = std::clamp(op[e], 0, R), n = std::clamp(op[e + 1], 0, R) - s;
          float* g = yp + static_cast<size_t>(e) * P * Q;
          if (n <= 0) {
            std::memset(g, 0, sizeof(float) * P * Q);
            continue;
          }
          cblas_sgemm(kRowMajor, kTrans, kNoTrans, P, Q, n, 1.0f, ap + static_cast<size_t>(s) * P, P,
                      bp + static_cast<size_t>(s) * Q, Q, 0.0f, g, Q);
        }
      });
      return;
    }
    const int in = a.shape(1), out_dim = out.shape(1);
    const bool t = transpose_;
    encoder.dispatch([=]() {
      int covered = 0;
      for (int e = 0; e < E; ++e) {
        const int s = std::clamp(op[e], 0, R), n = std::clamp(op[e + 1], 0, R) - s;
        if (n <= 0) continue;
        const float* w = bp + static_cast<size_t>(e) * in * out_dim;
        cblas_sgemm(kRowMajor, kNoTrans, t ? kTrans : kNoTrans, n, out_dim, in, 1.0f,
                    ap + static_cast<size_t>(s) * in, in, w, t ? in : out_dim, 0.0f,
                    yp + static_cast<size_t>(s) * out_dim, out_dim);
        covered = std::max(covered, s + n);
      }
      const int first = std::clamp(op[0], 0, R);
      std::memset(yp, 0, sizeof(float) * first * out_dim);
      std::memset(yp + static_cast<size_t>(covered) * out_dim, 0, sizeof(float) * (R - covered) * out_dim);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("SegmentMatmul runs on the CPU only");
  }

  const char* name() const override { return "SegmentMatmul"; }

 private:
  bool outer_, transpose_;
};


inline float exp_(float x) { return mx::detail::Exp{}(x); }

constexpr int kLanes = 16;  // independent partial results per row: lets GCC vectorise the reductions

float row_max(const float* x, int n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -INFINITY;
  int j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = x[j + l] > acc[l] ? x[j + l] : acc[l];
  float m = -INFINITY;
  for (int l = 0; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

float row_sum_exp(const float* x, int n, float m) {
  float acc[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += exp_(x[j + l] - m);
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) s += exp_(x[j] - m);
  return s;
}

class CrossEntropy : public mx::Primitive {
 public:
  CrossEntropy(mx::Stream s, bool backward) : mx::Primitive(s), backward_(backward) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const float* xp = inputs[0].data<float>();
    const int32_t* tp = inputs[1].data<int32_t>();
    const int N = inputs[1].size(), V = inputs[0].shape(-1);
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    if (!backward_) {
      float* cp = outputs[0].data<float>();
      float* lp = outputs[1].data<float>();
      encoder.dispatch([=]() {
        for (int i = 0; i < N; ++i) {
          const float* row = xp + static_cast<size_t>(i) * V;
          const float m = row_max(row, V);
          const float lse = m + std::log(row_sum_exp(row, V, m));
          lp[i] = lse;
          cp[i] = tp[i] >= 0 && tp[i] < V ? lse - row[tp[i]] : lse;
        }
      });
      return;
    }
    const float* lp = inputs[2].data<float>();
    const float* gp = inputs[3].data<float>();
    float* dp = outputs[0].data<float>();
    encoder.dispatch([=]() {
      for (int i = 0; i < N; ++i) {
        const float* row = xp + static_cast<size_t>(i) * V;
        float* out = dp + static_cast<size_t>(i) * V;
        const float lse = lp[i], g = gp[i];
        for (int j = 0; j < V; ++j) out[j] = exp_(row[j] - lse) * g;
        if (tp[i] >= 0 && tp[i] < V) out[tp[i]] -= g;
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("CrossEntropy runs on the CPU only");
  }

  const char* name() const override { return "CrossEntropy"; }

 private:
  bool backward_;
};

void check(const mx::array& x, int ndim, mx::Dtype dtype, const char* what) {
  if (x.ndim() != ndim || x.dtype() != dtype) {
    throw std::invalid_argument(std::string("segment_matmul: ") + what + " must be " + std::to_string(ndim) +
                                "-D " + (dtype == mx::float32 ? "float32" : "int32"));
  }
}

mx::array segment_rows(const mx::array& x, const mx::array& w, const mx::array& offsets, bool transpose) {
  check(x, 2, mx::float32, "x");
  check(w, 3, mx::float32, "w");
  check(offsets, 1, mx::int32, "offsets");
  const int in = transpose ? w.shape(2) : w.shape(1), out = transpose ? w.shape(1) : w.shape(2);
  if (x.shape(1) != in || offsets.shape(0) != w.shape(0) + 1) {
    throw std::invalid_argument("segment_matmul: x (R, in), w (E, out, in) or (E, in, out), offsets (E + 1,)");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array({x.shape(0), out}, mx::float32, std::make_shared<SegmentMatmul>(s, false, transpose),
                   {mx::contiguous(x, false, s), mx::contiguous(w, false, s), mx::contiguous(offsets, false, s)});
}

mx::array segment_outer(const mx::array& a, const mx::array& b, const mx::array& offsets) {
  check(a, 2, mx::float32, "a");
  check(b, 2, mx::float32, "b");
  check(offsets, 1, mx::int32, "offsets");
  if (a.shape(0) != b.shape(0)) throw std::invalid_argument("segment_outer: a and b need the same rows");
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array({offsets.shape(0) - 1, a.shape(1), b.shape(1)}, mx::float32,
                   std::make_shared<SegmentMatmul>(s, true, false),
                   {mx::contiguous(a, false, s), mx::contiguous(b, false, s), mx::contiguous(offsets, false, s)});
}

std::vector<mx::array> ce_forward(const mx::array& logits, const mx::array& targets) {
  check(logits, 2, mx::float32, "logits");
  check(targets, 1, mx::int32, "targets");
  if (targets.shape(0) != logits.shape(0)) throw std::invalid_argument("ce_forward: logits (N, V), targets (N,)");
  auto s = mx::to_stream(mx::Device::cpu);
  const int N = logits.shape(0);
  return mx::array::make_arrays({{N}, {N}}, {mx::float32, mx::float32}, std::make_shared<CrossEntropy>(s, false),
                                {mx::contiguous(logits, false, s), mx::contiguous(targets, false, s)});
}

mx::array ce_backward(const mx::array& logits, const mx::array& targets, const mx::array& lse, const mx::array& g) {
  check(logits, 2, mx::float32, "logits");
  check(targets, 1, mx::int32, "targets");
  check(lse, 1, mx::float32, "lse");
  check(g, 1, mx::float32, "g");
  const int N = logits.shape(0);
  if (targets.shape(0) != N || lse.shape(0) != N || g.shape(0) != N) {
    throw std::invalid_argument("ce_backward: logits (N, V), targets, lse and g (N,)");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(logits.shape(), mx::float32, std::make_shared<CrossEntropy>(s, true),
                   {mx::contiguous(logits, false, s), mx::contiguous(targets, false, s), mx::contiguous(lse, false, s),
                    mx::contiguous(g, false, s)});
}

}  // namespace

NB_MODULE(_dh_native, m) {
  m.def("segment_rows", &segment_rows, nb::arg("x"), nb::arg("w"), nb::arg("offsets"), nb::arg("transpose"));
  m.def("segment_outer", &segment_outer, nb::arg("a"), nb::arg("b"), nb::arg("offsets"));
  m.def("ce_forward", &ce_forward, nb::arg("logits"), nb::arg("targets"));
  m.def("ce_backward", &ce_backward, nb::arg("logits"), nb::arg("targets"), nb::arg("lse"), nb::arg("g"));
}
