// MLX primitives over quantized (MLX affine, 4 and 8 bits) and half-precision (bfloat16, float16) weights, in
// float32 arithmetic, without a float copy of the weights (the formats: quantized.h):
//   QMatmul:  x (..., K) @ W^T -> (..., N)   or, transposed (the input gradient), g (..., N) @ W -> (..., K)
//   QSegment: rows sorted by expert, E + 1 offsets: rows of e times W_e^T (or W_e): prefill and training experts
//   QExperts: a few tokens through their k experts (SwiGLU), weighted and summed: decode, one node
//   QEmbed:   rows of a quantized embedding
// Each takes W as `kind` 1 (bfloat16 / float16 weights) or 2 (packed weights, scales, biases); QExperts also 0
// (float32, through the BLAS). Up to `direct_rows()` activation rows run the direct kernels (the weights converted in
// registers); more rows convert a tile of weight rows to float32 and multiply it with the BLAS.
//
// The kernels come in three instruction sets, chosen when the module loads: AVX-512 (F/BW/VL/DQ), AVX2 (+FMA,
// F16C) or portable C++, the best the CPU has, or the one DH_MLX_ISA names; `set_isa` switches (for tests).
// Direct products of at least kParallelWork weights x rows split their output rows over a thread pool (pool.h;
// DH_MLX_THREADS threads, default one per core; `set_threads`), as do the decode experts over (token, expert) and
// the conversion of tiles; `limit_threads(n)` splits a product for n threads only (1: it runs on its caller's
// thread, as while two MLX streams train, each with its core; 0: every pool thread).
#include <atomic>
#include <cstdlib>

#include <nanobind/stl/string.h>

#include "common.h"
#include "pool.h"
#include "quantized.h"

namespace dhq {

float f16_to_f32(uint16_t h) {
  mx::float16_t v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

}  // namespace dhq

namespace dhn {
namespace {

using dhq::Fmt;
using dhq::HMat;
using dhq::Kernels;
using dhq::QMat;

std::atomic<int> g_direct_rows{8};  // up to this many activation rows: the direct kernels (`direct_rows`)
std::atomic<int> g_thread_limit{0};  // split a product for this many threads (0: the pool's; `limit_threads`)
constexpr size_t kParallelWork = 1 << 16;
constexpr size_t kTileFloats = 1 << 21;  // weight rows converted per BLAS call: 8 MB of float32

Pool& pool() {
  static Pool p([] {
    const char* env = std::getenv("DH_MLX_THREADS");
    const int n = env && *env ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
    return std::max(1, n);
  }());
  return p;
}

int threads() {
  const int limit = g_thread_limit.load();
  return limit > 0 ? std::min(limit, pool().size()) : pool().size();
}

}  // namespace

void parallel_for(int parts, size_t work, const std::function<void(int)>& f) {
  if (parts > 1 && work >= kParallelWork && threads() > 1) return pool().run(parts, f);
  for (int p = 0; p < parts; ++p) f(p);
}

namespace {

// f(n0, n1) over [0, N) in a few parts per thread (a thread the OS leaves waiting holds up only a small one),
// boundaries on multiples of 4 rows (the kernels' row blocks).
void split_rows(int N, size_t work, const std::function<void(int, int)>& f) {
  const int parts = work >= kParallelWork && threads() > 1 ? std::min(4 * threads(), (N + 3) / 4) : 1;
  if (parts <= 1) return f(0, N);
  const int per = ((N + parts - 1) / parts + 3) / 4 * 4;
  pool().run(parts, [&](int p) {
    const int n0 = std::min(N, p * per), n1 = std::min(N, n0 + per);
    if (n0 < n1) f(n0, n1);
  });
}
std::vector<const Kernels*> supported() {
  std::vector<const Kernels*> out;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    out.push_back(&dhq::kAvx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(&dhq::kAvx2);
#endif
  out.push_back(&dhq::kGeneric);
  return out;
}

const Kernels* find(const std::string& name) {
  for (const Kernels* k : supported())
    if (name == k->name) return k;
  return nullptr;
}

const Kernels* initial() {
  const char* env = std::getenv("DH_MLX_ISA");
  const Kernels* k = env && *env ? find(env) : nullptr;
  return k ? k : supported().front();
}

std::atomic<const Kernels*> g_active{initial()};

Fmt fmt_of(mx::Dtype d) { return d == mx::bfloat16 ? dhq::kBF16 : d == mx::float16 ? dhq::kF16 : dhq::kF32; }

// An input as a dispatched task reads it (captured by value when the primitive is scheduled).
struct In {
  const char* data;
  int item;
  bool contiguous;
  mx::Shape shape;
  mx::Strides strides;
  size_t size;
  Fmt t;
  explicit In(const mx::array& a)
      : data(a.data<char>()), item(static_cast<int>(a.itemsize())), contiguous(a.flags().row_contiguous),
        shape(a.shape()), strides(a.strides()), size(a.size()), t(fmt_of(a.dtype())) {}

  const void* bytes(std::vector<char>& scratch) const {  // row-major
    if (contiguous) return data;
    scratch.resize(size * item);
    const int nd = shape.size();
    std::vector<int64_t> idx(nd, 0);
    for (size_t i = 0; i < size; ++i) {
      int64_t off = 0;
      for (int d = 0; d < nd; ++d) off += idx[d] * strides[d];
      std::memcpy(scratch.data() + i * item, data + off * item, item);
      for (int d = nd - 1; d >= 0; --d) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
    return scratch.data();
  }

  const float* floats(std::vector<float>& scratch) const {  // row-major float32
    if (t == dhq::kF32 && contiguous) return reinterpret_cast<const float*>(data);
    std::vector<char> raw;
    const void* p = bytes(raw);
    scratch.resize(size);
    for (size_t i = 0; i < size; ++i) scratch[i] = dhq::load_f(p, t, i);
    return scratch.data();
  }

  int64_t index(size_t i, std::vector<char>& scratch) const {  // an integer input's i-th value
    const char* p = static_cast<const char*>(bytes(scratch)) + i * item;
    if (item == 8) return *reinterpret_cast<const int64_t*>(p);
    if (item == 4) return *reinterpret_cast<const int32_t*>(p);
    if (item == 2) return *reinterpret_cast<const int16_t*>(p);
    return *reinterpret_cast<const int8_t*>(p);
  }
};

void store(const float* y, void* out, Fmt t, size_t n) {
  if (t == dhq::kF32) {
    if (y != out) std::memcpy(out, y, n * sizeof(float));
  } else if (t == dhq::kBF16) {
    auto* o = static_cast<mx::bfloat16_t*>(out);
    for (size_t i = 0; i < n; ++i) o[i] = mx::bfloat16_t(y[i]);
  } else {
    auto* o = static_cast<mx::float16_t*>(out);
    for (size_t i = 0; i < n; ++i) o[i] = mx::float16_t(y[i]);
  }
}

std::vector<float>& buffer(int i, size_t n) {
  thread_local std::vector<float> bufs[4];
  if (bufs[i].size() < n) bufs[i].resize(n);
  return bufs[i];
}

// One weight matrix of a (stack of) matrices, as the kernels read it.
struct Weight {
  int kind;  // 0 float32, 1 half, 2 quantized
  const void* w;
  const void* s;
  const void* b;
  Fmt t;  // half weights' or scales' dtype
  int bits, group, N, K;
  QMat q(int e) const {
    const size_t rows = static_cast<size_t>(e) * N;
    const size_t es = dhq::fmt_size(t);
    return {static_cast<const uint32_t*>(w) + rows * K * bits / 32,
            static_cast<const char*>(s) + rows * (K / group) * es, static_cast<const char*>(b) + rows * (K / group) * es,
            t, bits, group, N, K};
  }
  HMat h(int e) const { return {static_cast<const uint16_t*>(w) + static_cast<size_t>(e) * N * K, t, N, K}; }
  const float* f(int e) const { return static_cast<const float*>(w) + static_cast<size_t>(e) * N * K; }
};

// Rows n0..n1 of W_e as float32 into `tile`, split over the pool.
void convert(const Kernels& k, const Weight& W, int e, int n0, int n1, float* tile) {
  const size_t K = W.K;
  split_rows(n1 - n0, (n1 - n0) * K, [&](int a, int b) {
    W.kind == 1 ? k.hconv(W.h(e), n0 + a, n0 + b, tile + a * K) : k.dequant(W.q(e), n0 + a, n0 + b, tile + a * K);
  });
}

int tile_rows(int N, int K) { return std::max(1, std::min<int>(N, static_cast<int>(kTileFloats / K))); }

// y (M, N; row stride yld) = x (M, K) @ W_e^T, float32.
void forward(const Kernels& k, const Weight& W, int e, const float* x, int M, float* y, size_t yld) {
  const int N = W.N, K = W.K;
  if (W.kind == 0) {
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, M, N, K, 1.0f, x, K, W.f(e), K, 0.0f, y, yld);
    return;
  }
  if (M <= g_direct_rows.load()) {
    const size_t work = static_cast<size_t>(N) * K * M;
    if (W.kind == 1) {
      const HMat h = W.h(e);
      return split_rows(N, work, [&](int n0, int n1) { k.hdot(h, x, M, K, n0, n1, y, yld); });
    }
    const size_t ld = dhq::prepared_len(K, W.bits, k.chunk_words), G = K / W.group;
    float* xp = buffer(0, M * ld).data();
    float* sums = buffer(1, M * G).data();
    for (int r = 0; r < M; ++r) dhq::prepare_row(x + r * K, K, W.bits, W.group, k.chunk_words, xp + r * ld, sums + r * G);
    const QMat q = W.q(e);
    const dhq::Prepared px{xp, ld, sums, G, M};
    return split_rows(N, work, [&](int n0, int n1) { k.qdot(q, px, n0, n1, y, yld); });
  }
  const int T = tile_rows(N, K);
  float* tile = buffer(2, static_cast<size_t>(T) * K).data();
  for (int n0 = 0; n0 < N; n0 += T) {
    const int n1 = std::min(N, n0 + T);
    convert(k, W, e, n0, n1, tile);
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, M, n1 - n0, K, 1.0f, x, K, tile, K, 0.0f, y + n0, yld);
  }
}

// y (M, K) = g (M, N) @ W_e, float32 (the input gradient of `forward`).
void backward(const Kernels& k, const Weight& W, int e, const float* g, int M, float* y) {
  const int N = W.N, K = W.K, T = tile_rows(N, K);
  if (W.kind == 0) {
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, M, K, N, 1.0f, g, N, W.f(e), K, 0.0f, y, K);
    return;
  }
  float* tile = buffer(2, static_cast<size_t>(T) * K).data();
  for (int n0 = 0; n0 < N; n0 += T) {
    const int n1 = std::min(N, n0 + T);
    convert(k, W, e, n0, n1, tile);
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, M, K, n1 - n0, 1.0f, g + n0, N, tile, K, n0 ? 1.0f : 0.0f, y, K);
  }
}

struct Spec {  // what the Python side says about one weight input
  int kind, bits, group, N, K;
  bool operator==(const Spec& o) const {
    return kind == o.kind && bits == o.bits && group == o.group && N == o.N && K == o.K;
  }
};

Weight weight(const Spec& sp, const In& w, const In& s, const In& b, std::vector<char>* scratch) {
  return {sp.kind, w.bytes(scratch[0]), s.bytes(scratch[1]), b.bytes(scratch[2]), sp.kind == 2 ? s.t : w.t,
          sp.bits, sp.group, sp.N, sp.K};
}


inline float silu_(float g) { return g / (1.0f + exp_(-g)); }

// A primitive over weight inputs described by Specs; `dtype` is its output's.
class WeightPrimitive : public CpuPrimitive {
 public:
  WeightPrimitive(mx::Stream s, std::vector<Spec> specs, int mode) : CpuPrimitive(s), specs_(std::move(specs)), mode_(mode) {}
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const WeightPrimitive&>(other);
    return std::string(name()) == o.name() && specs_ == o.specs_ && mode_ == o.mode_;
  }

 protected:
  std::vector<Spec> specs_;
  int mode_;
};

class QMatmul : public WeightPrimitive {  // mode 1: x @ W^T, 0: g @ W
 public:
  using WeightPrimitive::WeightPrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    allocate(outputs);
    const Spec sp = specs_[0];
    const bool t = mode_ == 1;
    const int M = inputs[0].size() / inputs[0].shape(-1);
    char* op = outputs[0].data<char>();
    const Fmt ot = fmt_of(outputs[0].dtype());
    const Kernels* k = g_active.load();
    mx::cpu::get_command_encoder(stream()).dispatch(
        [=, x = In(inputs[0]), w = In(inputs[1]), s = In(inputs[2]), b = In(inputs[3])]() {
          std::vector<char> raw[3];
          std::vector<float> sx;
          const float* xp = x.floats(sx);
          const Weight W = weight(sp, w, s, b, raw);
          const size_t n = static_cast<size_t>(M) * (t ? sp.N : sp.K);
          float* y = ot == dhq::kF32 ? reinterpret_cast<float*>(op) : buffer(3, n).data();
          t ? forward(*k, W, 0, xp, M, y, sp.N) : backward(*k, W, 0, xp, M, y);
          store(y, op, ot, n);
        });
  }
  const char* name() const override { return "QMatmul"; }
};

class QSegment : public WeightPrimitive {  // rows offsets[e]..offsets[e + 1] times W_e^T (mode 1) or W_e (mode 0)
 public:
  using WeightPrimitive::WeightPrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    allocate(outputs);
    const Spec sp = specs_[0];
    const bool t = mode_ == 1;
    const int R = inputs[0].shape(0), E = inputs[4].size() - 1, out_dim = t ? sp.N : sp.K, in_dim = t ? sp.K : sp.N;
    char* op = outputs[0].data<char>();
    const Fmt ot = fmt_of(outputs[0].dtype());
    const Kernels* k = g_active.load();
    mx::cpu::get_command_encoder(stream()).dispatch([=, x = In(inputs[0]), w = In(inputs[1]), s = In(inputs[2]),
                                                     b = In(inputs[3]), off = In(inputs[4])]() {
      std::vector<char> raw[4];
      std::vector<float> sx;
      const float* xp = x.floats(sx);
      const Weight W = weight(sp, w, s, b, raw);
      const int32_t* o = static_cast<const int32_t*>(off.bytes(raw[3]));
      const size_t n = static_cast<size_t>(R) * out_dim;
      float* y = ot == dhq::kF32 ? reinterpret_cast<float*>(op) : buffer(3, n).data();
      std::memset(y, 0, n * sizeof(float));  // rows outside every run
      for (int e = 0; e < E; ++e) {
        const int s0 = std::clamp(o[e], 0, R), rows = std::clamp(o[e + 1], 0, R) - s0;
        if (rows <= 0) continue;
        const float* xe = xp + static_cast<size_t>(s0) * in_dim;
        float* ye = y + static_cast<size_t>(s0) * out_dim;
        t ? forward(*k, W, e, xe, rows, ye, out_dim) : backward(*k, W, e, xe, rows, ye);
      }
      store(y, op, ot, n);
    });
  }
  const char* name() const override { return "QSegment"; }
};

class QExperts : public WeightPrimitive {  // y[t] = sum_j w[t, j] down_e(silu(gate_e x[t]) * up_e x[t]), e = idx[t, j]
 public:
  using WeightPrimitive::WeightPrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    allocate(outputs);
    const Spec gs = specs_[0], us = specs_[1], ds = specs_[2];
    const int D = gs.K, I = gs.N, kk = inputs[1].shape(-1), T = inputs[0].size() / D, E = inputs[3].shape(0);
    char* op = outputs[0].data<char>();
    const Fmt ot = fmt_of(outputs[0].dtype());
    const Kernels* k = g_active.load();
    std::vector<In> in;
    for (const auto& a : inputs) in.emplace_back(a);
    mx::cpu::get_command_encoder(stream()).dispatch([=]() {
      std::vector<char> raw[10];
      std::vector<float> sx, sw;
      const float* xp = in[0].floats(sx);
      const float* wp = in[2].floats(sw);
      const Weight G = weight(gs, in[3], in[4], in[5], raw), U = weight(us, in[6], in[7], in[8], raw + 3),
                   Dn = weight(ds, in[9], in[10], in[11], raw + 6);
      std::vector<int> ids(static_cast<size_t>(T) * kk);
      for (size_t i = 0; i < ids.size(); ++i)
        ids[i] = static_cast<int>(std::clamp<int64_t>(in[1].index(i, raw[9]), 0, E - 1));
      // One part per expert chosen, over all its (token, expert) pairs at once (a batch of decoding sequences
      // reads each expert's weights once), each pair into its own row of `out`; a token's k rows are then summed
      // in order (the same result however the parts were shared out).
      const size_t P = ids.size();
      std::vector<int> order(P);
      for (size_t p = 0; p < P; ++p) order[p] = static_cast<int>(p);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return ids[a] < ids[b]; });
      std::vector<int> starts;  // order[starts[i] .. starts[i + 1]) share one expert
      for (size_t p = 0; p < P; ++p)
        if (p == 0 || ids[order[p]] != ids[order[p - 1]]) starts.push_back(static_cast<int>(p));
      starts.push_back(static_cast<int>(P));
      std::vector<float> out(P * D);
      auto group = [&](int i) {
        const int p0 = starts[i], m = starts[i + 1] - p0, e = ids[order[p0]];
        std::vector<float> xs(static_cast<size_t>(m) * D), g(static_cast<size_t>(m) * I), u(g.size()), ys(xs.size());
        for (int r = 0; r < m; ++r)  // the expert's tokens, gathered
          std::memcpy(xs.data() + static_cast<size_t>(r) * D, xp + static_cast<size_t>(order[p0 + r] / kk) * D,
                      sizeof(float) * D);
        SmallBlas one(static_cast<double>(I) * D);
        // A row's result must not depend on which other rows chose the expert (a sequence decodes the same
        // alone or in a batch): the direct kernels compute each row the same way for any row count; a BLAS
        // product does not, so it takes the rows one at a time (the expert's weights then come from cache).
        auto rows = [&](const Weight& W, const float* x, size_t xld, float* y, size_t yld) {
          if (W.kind != 0 && m <= g_direct_rows.load()) return forward(*k, W, e, x, m, y, yld);
          for (int r = 0; r < m; ++r) forward(*k, W, e, x + r * xld, 1, y + r * yld, yld);
        };
        rows(G, xs.data(), D, g.data(), I);
        rows(U, xs.data(), D, u.data(), I);
        for (size_t j = 0; j < g.size(); ++j) g[j] = silu_(g[j]) * u[j];
        rows(Dn, g.data(), I, ys.data(), D);
        for (int r = 0; r < m; ++r)  // each pair's row of `out`
          std::memcpy(out.data() + static_cast<size_t>(order[p0 + r]) * D, ys.data() + static_cast<size_t>(r) * D,
                      sizeof(float) * D);
      };
      parallel_for(static_cast<int>(starts.size()) - 1, P * 3 * I * D, group);
      std::vector<float> acc(D);
      for (int t = 0; t < T; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int j = 0; j < kk; ++j) {
          const float wj = wp[t * kk + j], *d = out.data() + (static_cast<size_t>(t) * kk + j) * D;
          for (int i = 0; i < D; ++i) acc[i] += wj * d[i];
        }
        store(acc.data(), op + static_cast<size_t>(t) * D * dhq::fmt_size(ot), ot, D);
      }
    });
  }
  const char* name() const override { return "QExperts"; }
};

class QEmbed : public WeightPrimitive {
 public:
  using WeightPrimitive::WeightPrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    allocate(outputs);
    const Spec sp = specs_[0];
    char* op = outputs[0].data<char>();
    const Fmt ot = fmt_of(outputs[0].dtype());
    const size_t osize = dhq::fmt_size(ot);
    const Kernels* k = g_active.load();
    mx::cpu::get_command_encoder(stream()).dispatch(
        [=, ids = In(inputs[0]), w = In(inputs[1]), s = In(inputs[2]), b = In(inputs[3])]() {
          std::vector<char> raw[4];
          const Weight W = weight(sp, w, s, b, raw);
          float* row = buffer(3, sp.K).data();
          for (size_t i = 0; i < ids.size; ++i) {
            const int id = static_cast<int>(std::clamp<int64_t>(ids.index(i, raw[3]), 0, sp.N - 1));
            k->dequant(W.q(0), id, id + 1, row);
            store(row, op + i * sp.K * osize, ot, sp.K);
          }
        });
  }
  const char* name() const override { return "QEmbed"; }
};

// ---- Python-facing functions: checks, then one node -------------------------------------------------------------
[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

bool is_float(const mx::array& a) { return a.dtype() == mx::float32 || a.dtype() == mx::bfloat16 || a.dtype() == mx::float16; }

// The Spec of weight `w` (stacked: `stacked` leading axis) with `scales`; bits 0: float weights (half or float32).
Spec spec(const mx::array& w, const mx::array& scales, const mx::array& biases, int bits, int group, bool stacked,
          const char* op) {
  const int nd = stacked ? 3 : 2;
  if (w.ndim() != nd) bad(std::string(op) + ": weight must be " + std::to_string(nd) + "-D");
  if (bits == 0) {
    if (!is_float(w)) bad(std::string(op) + ": float weights must be float32, bfloat16 or float16");
    return {w.dtype() == mx::float32 ? 0 : 1, 0, 1, w.shape(-2), w.shape(-1)};
  }
  if ((bits != 4 && bits != 8) || (group != 32 && group != 64 && group != 128))
    bad(std::string(op) + ": bits must be 4 or 8 and group_size 32, 64 or 128");
  if (w.dtype() != mx::uint32 || !is_float(scales) || biases.dtype() != scales.dtype() || scales.shape() != biases.shape() ||
      scales.ndim() != nd || scales.shape(-2) != w.shape(-2) || (stacked && scales.shape(0) != w.shape(0)))
    bad(std::string(op) + ": packed uint32 weight (..., N, K * bits / 32) and float scales, biases (..., N, K / group)");
  const int K = scales.shape(-1) * group;
  if (static_cast<int64_t>(w.shape(-1)) * 32 != static_cast<int64_t>(K) * bits)
    bad(std::string(op) + ": weight, scales and group_size disagree on the input width");
  return {2, bits, group, w.shape(-2), K};
}

mx::Stream cpu() { return mx::to_stream(mx::Device::cpu); }

mx::array qmatmul(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases, int bits,
                  int group_size, bool transpose, mx::Dtype dtype) {
  const Spec sp = spec(w, scales, biases, bits, group_size, false, "qmatmul");
  if (!is_float(x) || x.ndim() < 1 || x.shape(-1) != (transpose ? sp.K : sp.N)) bad("qmatmul: x (..., in) float");
  mx::Shape shape = x.shape();
  shape.back() = transpose ? sp.N : sp.K;
  return mx::array(shape, dtype, std::make_shared<QMatmul>(cpu(), std::vector<Spec>{sp}, transpose ? 1 : 0),
                   {x, w, scales, biases});
}

mx::array qsegment(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                   const mx::array& offsets, int bits, int group_size, bool transpose, mx::Dtype dtype) {
  const Spec sp = spec(w, scales, biases, bits, group_size, true, "qsegment");
  if (!is_float(x) || x.ndim() != 2 || x.shape(1) != (transpose ? sp.K : sp.N)) bad("qsegment: x (R, in) float");
  if (offsets.dtype() != mx::int32 || offsets.ndim() != 1 || offsets.shape(0) != w.shape(0) + 1)
    bad("qsegment: offsets (E + 1,) int32");
  return mx::array({x.shape(0), transpose ? sp.N : sp.K}, dtype,
                   std::make_shared<QSegment>(cpu(), std::vector<Spec>{sp}, transpose ? 1 : 0),
                   {x, w, scales, biases, offsets});
}

mx::array qexperts(const mx::array& x, const mx::array& idx, const mx::array& weights, const std::vector<mx::array>& gate,
                   const std::vector<mx::array>& up, const std::vector<mx::array>& down, const std::vector<int>& bits,
                   const std::vector<int>& groups, mx::Dtype dtype) {
  if (gate.size() != 3 || up.size() != 3 || down.size() != 3 || bits.size() != 3 || groups.size() != 3)
    bad("qexperts: gate, up and down are (weight, scales, biases); bits and groups one per projection");
  const Spec g = spec(gate[0], gate[1], gate[2], bits[0], groups[0], true, "qexperts");
  const Spec u = spec(up[0], up[1], up[2], bits[1], groups[1], true, "qexperts");
  const Spec d = spec(down[0], down[1], down[2], bits[2], groups[2], true, "qexperts");
  const int E = gate[0].shape(0);
  if (!is_float(x) || !is_float(weights) || x.shape(-1) != g.K || u.N != g.N || u.K != g.K || d.N != g.K || d.K != g.N ||
      up[0].shape(0) != E || down[0].shape(0) != E || (idx.dtype() != mx::int32 && idx.dtype() != mx::uint32) ||
      weights.shape() != idx.shape() || idx.size() / idx.shape(-1) != x.size() / g.K)
    bad("qexperts: x (..., D), idx (u)int32 and weights (..., k), gate and up (E, I, D), down (E, D, I)");
  std::vector<mx::array> in{x, idx, weights};
  for (const auto* p : {&gate, &up, &down}) in.insert(in.end(), p->begin(), p->end());
  return mx::array(x.shape(), dtype, std::make_shared<QExperts>(cpu(), std::vector<Spec>{g, u, d}, 0), in);
}

mx::array qembed(const mx::array& ids, const mx::array& w, const mx::array& scales, const mx::array& biases, int bits,
                 int group_size, mx::Dtype dtype) {
  const Spec sp = spec(w, scales, biases, bits, group_size, false, "qembed");
  if (!mx::issubdtype(ids.dtype(), mx::integer)) bad("qembed: ids must be integers");
  mx::Shape shape = ids.shape();
  shape.push_back(sp.K);
  return mx::array(shape, dtype, std::make_shared<QEmbed>(cpu(), std::vector<Spec>{sp}, 0), {ids, w, scales, biases});
}

std::string set_isa(const std::string& name) {
  const Kernels* k = find(name);
  if (!k) bad("set_isa: " + name + " is not supported on this CPU");
  return g_active.exchange(k)->name;
}

std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (const Kernels* k : supported()) out.emplace_back(k->name);
  return out;
}

}  // namespace

void register_quantized(nb::module_& m) {
  m.def("qmatmul", &qmatmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("bits"),
        nb::arg("group_size"), nb::arg("transpose"), nb::arg("dtype"));
  m.def("qsegment", &qsegment, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("offsets"),
        nb::arg("bits"), nb::arg("group_size"), nb::arg("transpose"), nb::arg("dtype"));
  m.def("qexperts", &qexperts, nb::arg("x"), nb::arg("idx"), nb::arg("weights"), nb::arg("gate"), nb::arg("up"),
        nb::arg("down"), nb::arg("bits"), nb::arg("groups"), nb::arg("dtype"));
  m.def("qembed", &qembed, nb::arg("ids"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("bits"),
        nb::arg("group_size"), nb::arg("dtype"));
  m.def("isa", []() { return std::string(g_active.load()->name); });
  m.def("isas", &isas);
  m.def("set_isa", &set_isa, nb::arg("name"));
  m.def("threads", []() { return pool().size(); });
  m.def("limit_threads", [](int n) { return g_thread_limit.exchange(std::max(0, n)); }, nb::arg("n"));
  m.def("direct_rows", [](int n) { return n < 0 ? g_direct_rows.load() : g_direct_rows.exchange(n); },
        nb::arg("n") = -1);
  m.def("set_threads", [](int n) {
    const int before = pool().size();
    pool().resize(std::max(1, n));
    return before;
  }, nb::arg("n"));
}

}  // namespace dhn
