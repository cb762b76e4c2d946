// Native CPU kernels for dh-mlx, as MLX primitives (built by dh_mlx/backend/cpu/native/__init__.py).
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
//
// Decode-sized building blocks, each one node instead of MLX's 3-14 (each node of a decode step costs
// microseconds of dispatch), each with its gradient as MLX ops:
//   Linear:  x (..., in), w (out, in) -> x @ w^T (one sgemm; MLX adds flatten/transpose/unflatten nodes)
//   Rope:    rotary embedding of the last axis' first `dims` entries at positions offset + (axis -2 index),
//            angle = position / wavelength[i] (mx.fast.rope's `freqs`), times `scale`; `inverse` rotates back
//            (the gradient). mx.fast.rope on the CPU is a 14-node fallback that recomputes cos/sin.
//   RmsNorm: x * rsqrt(mean(x^2) + eps) * w over the last axis (MLX's CPU fallback: 3 nodes).
//   MlaAbsorbed: MLA attention for a few queries over the latent cache, kv_b_proj folded in (decode):
//            q_lat = q_nope W_uk[h]; p = softmax(scale (q_lat latent^T + q_pe k_pe^T)) over the visible keys;
//            out = (p latent) W_uv[h]^T; keys visible per mode: all, causal (query l of L sees keys up to
//            S - L + l) or a bool mask (B|1, 1, L, S), of which only the span a sequence sees is read. One
//            node instead of ~40 (no gradient: dh_mlx differentiates it through MLX ops).
//   Route:   the MoE router after its linear: sigmoid/softmax scores, the selection bias (noaux_tc), group-
//            limited choice (a group scores its best expert, or its best two summed for noaux_tc), top-k,
//            weights from the unbiased scores (renormalised, scaled) -> indices, weights, scores (~20 nodes).
//            With domain routing, a token whose flag is set chooses among its domain's experts instead.
// The decode-sized kernels run their small BLAS products on one thread (SmallBlas, common.h) and share a
// batch's sequences (MlaAbsorbed) over the weight kernels' pool; the decode experts are quantized.cpp's QExperts.
// Inputs with gaps or odd strides are copied to a dense buffer first.
#include "common.h"

namespace {

using namespace dhn;


class SegmentMatmul : public CpuPrimitive {
 public:
  SegmentMatmul(mx::Stream s, bool outer, bool transpose) : CpuPrimitive(s), outer_(outer), transpose_(transpose) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &a = inputs[0], &b = inputs[1], &off = inputs[2];
    allocate(outputs);
    mx::array& out = outputs[0];
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

  const char* name() const override { return "SegmentMatmul"; }

 private:
  bool outer_, transpose_;
};



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

class CrossEntropy : public CpuPrimitive {
 public:
  CrossEntropy(mx::Stream s, bool backward) : CpuPrimitive(s), backward_(backward) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const float* xp = inputs[0].data<float>();
    const int32_t* tp = inputs[1].data<int32_t>();
    const int N = inputs[1].size(), V = inputs[0].shape(-1);
    allocate(outputs);
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

  const char* name() const override { return "CrossEntropy"; }

 private:
  bool backward_;
};



class Linear : public CpuPrimitive {
 public:
  explicit Linear(mx::Stream s) : CpuPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &x = inputs[0], &w = inputs[1];
    allocate(outputs);
    mx::array& out = outputs[0];
    const int N = w.shape(0), K = w.shape(1), M = x.size() / K;
    float* yp = out.data<float>();
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.dispatch([=, xv = View<float>(x), wv = View<float>(w)]() {
      std::vector<float> sx, sw;
      const float* xp = xv.dense(sx);
      const float* wp = wv.dense(sw);
      SmallBlas one(static_cast<double>(M) * N * K);
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, M, N, K, 1.0f, xp, K, wp, K, 0.0f, yp, N);
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const mx::array &x = primals[0], &w = primals[1], &g = cotangents[0];
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a == 0) {
        grads.push_back(mx::matmul(g, w, stream()));
      } else {  // (out, M) @ (M, in): row-major, as the optimizer's fused update reads it
        const int N = w.shape(0), K = w.shape(1);
        grads.push_back(mx::matmul(mx::transpose(mx::reshape(g, {-1, N}, stream()), stream()),
                                   mx::reshape(x, {-1, K}, stream()), stream()));
      }
    }
    return grads;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
  const char* name() const override { return "Linear"; }
};

class Rope : public CpuPrimitive {
 public:
  Rope(mx::Stream s, int dims, bool traditional, float scale, bool inverse)
      : CpuPrimitive(s), dims_(dims), traditional_(traditional), scale_(scale), inverse_(inverse) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &x = inputs[0], &off = inputs[1], &wl = inputs[2];
    allocate(outputs);
    mx::array& out = outputs[0];
    const int P = x.shape(-1), L = x.shape(-2), half = dims_ / 2;
    const size_t rows = x.size() / (static_cast<size_t>(L) * P);
    const bool trad = traditional_, inv = inverse_;
    const int dims = dims_;
    const float scale = scale_;
    float* yp = out.data<float>();
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.dispatch([=, xv = View<float>(x), wv = View<float>(wl), op = off.data<int32_t>()]() {
      std::vector<float> sx, swl;
      const float* xp = xv.dense(sx);
      const float* wp = wv.dense(swl);
      const int32_t offset = op[0];
      std::vector<float> cs(static_cast<size_t>(L) * half), sn(cs.size());
      for (int l = 0; l < L; ++l) {
        const float pos = static_cast<float>(offset + l);
        for (int i = 0; i < half; ++i) {
          const float theta = pos * (1.0f / wp[i]);
          cs[l * half + i] = std::cos(theta) * scale;
          sn[l * half + i] = (inv ? -std::sin(theta) : std::sin(theta)) * scale;
        }
      }
      for (size_t r = 0; r < rows; ++r) {
        for (int l = 0; l < L; ++l) {
          const float* a = xp + (r * L + l) * P;
          float* y = yp + (r * L + l) * P;
          const float* c = cs.data() + l * half;
          const float* s = sn.data() + l * half;
          for (int i = 0; i < half; ++i) {
            const int i0 = trad ? 2 * i : i, i1 = trad ? 2 * i + 1 : i + half;
            const float u = a[i0], v = a[i1];
            y[i0] = u * c[i] - v * s[i];
            y[i1] = u * s[i] + v * c[i];
          }
          for (int j = dims; j < P; ++j) y[j] = a[j] * scale;
        }
      }
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a == 0) {  // the transpose of a rotation is the rotation back
        grads.push_back(mx::array(cotangents[0].shape(), mx::float32,
                                  std::make_shared<Rope>(stream(), dims_, traditional_, scale_, !inverse_),
                                  {cotangents[0], primals[1], primals[2]}));
      } else {
        grads.push_back(mx::zeros_like(primals[a], stream()));
      }
    }
    return grads;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Rope&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_ && scale_ == o.scale_ && inverse_ == o.inverse_;
  }
  const char* name() const override { return "Rope"; }

 private:
  int dims_;
  bool traditional_;
  float scale_;
  bool inverse_;
};

class RmsNorm : public CpuPrimitive {
 public:
  RmsNorm(mx::Stream s, float eps) : CpuPrimitive(s), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &x = inputs[0], &w = inputs[1];
    allocate(outputs);
    mx::array& out = outputs[0];
    const int D = x.shape(-1);
    const size_t rows = x.size() / D;
    const float eps = eps_;
    float* yp = out.data<float>();
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.dispatch([=, xv = View<float>(x), wv = View<float>(w)]() {
      std::vector<float> sx, sw;
      const float* xp = xv.dense(sx);
      const float* wp = wv.dense(sw);
      for (size_t r = 0; r < rows; ++r) {
        const float* a = xp + r * D;
        float acc[kLanes] = {};
        int j = 0;
        for (; j + kLanes <= D; j += kLanes)
          for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * a[j + l];
        float ss = 0.0f;
        for (int l = 0; l < kLanes; ++l) ss += acc[l];
        for (; j < D; ++j) ss += a[j] * a[j];
        const float k = 1.0f / std::sqrt(ss / D + eps);
        float* y = yp + r * D;
        for (j = 0; j < D; ++j) y[j] = a[j] * k * wp[j];
      }
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const auto s = stream();
    const mx::array &x = primals[0], &w = primals[1], &g = cotangents[0];
    // r = rsqrt(mean(x^2) + eps), n = x r: dx = r (g w - n mean(g w n)), dw = sum over rows of g n.
    const mx::array r = mx::rsqrt(mx::add(mx::mean(mx::square(x, s), -1, true, s), mx::array(eps_), s), s);
    const mx::array n = mx::multiply(x, r, s);
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a == 0) {
        const mx::array gw = mx::multiply(g, w, s);
        grads.push_back(mx::multiply(
            r, mx::subtract(gw, mx::multiply(n, mx::mean(mx::multiply(gw, n, s), -1, true, s), s), s), s));
      } else {
        std::vector<int> lead(x.ndim() - 1);
        for (int d = 0; d < x.ndim() - 1; ++d) lead[d] = d;
        grads.push_back(mx::sum(mx::multiply(g, n, s), lead, false, s));
      }
    }
    return grads;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  const char* name() const override { return "RmsNorm"; }

 private:
  float eps_;
};


class MlaAbsorbed : public CpuPrimitive {
 public:
  MlaAbsorbed(mx::Stream s, int mode, float scale) : CpuPrimitive(s), mode_(mode), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &qn = inputs[0], &qp = inputs[1], &lat = inputs[2], &kp = inputs[3], &w = inputs[4],
                    &mask = inputs[5];
    allocate(outputs);
    mx::array& out = outputs[0];
    const int B = qn.shape(0), H = qn.shape(1), L = qn.shape(2), n = qn.shape(3), p = qp.shape(3);
    const int S = lat.shape(2), r = lat.shape(3), v = out.shape(3);
    const int mode = mode_, mb = mode == 2 ? mask.shape(0) : 1;
    const float scale = scale_;
    float* yp = out.data<float>();
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.dispatch([=, qnv = View<float>(qn), qpv = View<float>(qp), lv = View<float>(lat), kv = View<float>(kp),
                      wv = View<float>(w), mv = View<uint8_t>(mask)]() {
      std::vector<float> s1, s2, s3, s4, s5;
      std::vector<uint8_t> s6;
      const float* qnp = qnv.dense(s1);
      const float* qpp = qpv.dense(s2);
      const float* lp = lv.dense(s3);
      const float* kpp = kv.dense(s4);
      const float* wp = wv.dense(s5);
      const uint8_t* vis = mode == 2 ? mv.dense(s6) : nullptr;  // bool mask (mb, 1, L, S)
      const int HL = H * L;
      // One part per sequence of the batch (each attends to its own cache), shared over the pool.
      auto row = [&](int b) {
        std::vector<float> qlat(static_cast<size_t>(HL) * r), sc(static_cast<size_t>(HL) * S), olat(qlat.size());
        std::vector<float> sums(HL);
        // one BLAS thread per part when the parts share the cores
        SmallBlas one(B > 1 ? 0.0 : static_cast<double>(HL) * S * std::max(r, n));
        // Only the span of positions some query of this sequence sees is read (a padded batch's rows and a
        // fixed-capacity cache hide the rest): t0 .. t1.
        int t0 = 0, t1 = S;
        if (vis) {
          t0 = S, t1 = 0;
          for (int l = 0; l < L; ++l) {
            const uint8_t* vrow = vis + (static_cast<size_t>(b % mb) * L + l) * S;
            for (int t = 0; t < S; ++t)
              if (vrow[t]) t0 = std::min(t0, t), t1 = std::max(t1, t + 1);
          }
          t1 = std::max(t0, t1);
        }
        const int W = t1 - t0;  // the span's width (the score rows' stride)
        const float* latb = lp + (static_cast<size_t>(b) * S + t0) * r;
        const float* kpb = kpp + (static_cast<size_t>(b) * S + t0) * p;
        for (int h = 0; h < H; ++h)  // q_lat[h] (L, r) = q_nope[b, h] (L, n) @ W_uk[h] (n, r)
          cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, L, r, n, 1.0f,
                      qnp + (static_cast<size_t>(b) * H + h) * L * n, n, wp + static_cast<size_t>(h) * (n + v) * r, r,
                      0.0f, qlat.data() + static_cast<size_t>(h) * L * r, r);
        if (W > 0) {
          cblas_sgemm(kRowMajor, kNoTrans, kTrans, HL, W, r, scale, qlat.data(), r, latb, r, 0.0f, sc.data(), W);
          cblas_sgemm(kRowMajor, kNoTrans, kTrans, HL, W, p, scale, qpp + static_cast<size_t>(b) * HL * p, p, kpb, p,
                      1.0f, sc.data(), W);
        }
        for (int row = 0; row < HL; ++row) {
          const int l = row % L;
          float* srow = sc.data() + static_cast<size_t>(row) * W;
          const uint8_t* vrow = vis ? vis + (static_cast<size_t>(b % mb) * L + l) * S + t0 : nullptr;
          const int lim = mode == 1 ? S - L + l + 1 : W;
          float m = -INFINITY;
          for (int t = 0; t < lim; ++t)
            if (!vrow || vrow[t]) m = srow[t] > m ? srow[t] : m;
          float sum = 0.0f;
          for (int t = 0; t < W; ++t) {
            const float e = (t < lim && (!vrow || vrow[t])) ? exp_(srow[t] - m) : 0.0f;
            srow[t] = e;
            sum += e;
          }
          sums[row] = sum;
        }
        if (W > 0)
          cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, HL, r, W, 1.0f, sc.data(), W, latb, r, 0.0f, olat.data(), r);
        else
          std::fill(olat.begin(), olat.end(), 0.0f);
        for (int row = 0; row < HL; ++row) {
          const float inv = 1.0f / sums[row];
          for (int j = 0; j < r; ++j) olat[static_cast<size_t>(row) * r + j] *= inv;
        }
        for (int h = 0; h < H; ++h)  // out[b, h] (L, v) = o_lat[h] (L, r) @ W_uv[h]^T (r, v)
          cblas_sgemm(kRowMajor, kNoTrans, kTrans, L, v, r, 1.0f, olat.data() + static_cast<size_t>(h) * L * r, r,
                      wp + (static_cast<size_t>(h) * (n + v) + n) * r, r, 0.0f,
                      yp + (static_cast<size_t>(b) * H + h) * L * v, v);
      };
      parallel_for(B, static_cast<size_t>(B) * HL * S * (2 * r + p), row);
    });
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const MlaAbsorbed&>(other);
    return mode_ == o.mode_ && scale_ == o.scale_;
  }
  const char* name() const override { return "MlaAbsorbed"; }

 private:
  int mode_;
  float scale_;
};


class Route : public CpuPrimitive {
 public:
  Route(mx::Stream s, bool sigmoid, int method, int groups, int topk_groups, int k, bool renorm, float scaling,
        bool domains)
      : CpuPrimitive(s), sigmoid_(sigmoid), method_(method), groups_(groups), topk_groups_(topk_groups), k_(k),
        renorm_(renorm), scaling_(scaling), domains_(domains) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    allocate(outputs);
    const int E = inputs[0].shape(-1), N = inputs[0].size() / E;
    const bool sigmoid = sigmoid_, renorm = renorm_, domains = domains_;
    const int method = method_, G = groups_, TG = topk_groups_, k = k_;
    const float scaling = scaling_;
    int32_t* ip = outputs[0].data<int32_t>();
    float* wp = outputs[1].data<float>();
    float* sp = outputs[2].data<float>();
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.dispatch([=, lv = View<float>(inputs[0]), bv = View<float>(inputs[1]), av = View<uint8_t>(inputs[2]),
                      fv = View<uint8_t>(inputs[3])]() {
      std::vector<float> s1, s2, choice(E), gscore(std::max(G, 1));
      std::vector<int> order(E), gorder(std::max(G, 1));
      std::vector<uint8_t> s3, s4;
      const float* lp = lv.dense(s1);
      const float* bp = bv.dense(s2);
      const uint8_t* allowed = domains ? av.dense(s3) : nullptr;  // (N, E) bool, maybe a broadcast view
      const uint8_t* flag = domains ? fv.dense(s4) : nullptr;     // (N,) bool: the token has a domain
      const int per = E / std::max(G, 1);
      for (int t = 0; t < N; ++t) {
        const float* lg = lp + static_cast<size_t>(t) * E;
        float* sc = sp + static_cast<size_t>(t) * E;
        if (sigmoid) {
          for (int e = 0; e < E; ++e) sc[e] = 1.0f / (1.0f + exp_(-lg[e]));
        } else {
          float m = -INFINITY, sum = 0.0f;
          for (int e = 0; e < E; ++e) m = lg[e] > m ? lg[e] : m;
          for (int e = 0; e < E; ++e) sum += (sc[e] = exp_(lg[e] - m));
          for (int e = 0; e < E; ++e) sc[e] /= sum;
        }
        for (int e = 0; e < E; ++e) choice[e] = sc[e] + (method == 2 ? bp[e] : 0.0f);
        if (domains && flag[t]) {  // the token's domain experts replace the group rule
          for (int e = 0; e < E; ++e)
            if (!allowed[static_cast<size_t>(t) * E + e]) choice[e] = -INFINITY;
        } else if (G > 1 && method != 0) {  // keep the TG best groups
          for (int g = 0; g < G; ++g) {
            float a = -INFINITY, b = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; ++e) {
              if (choice[e] > a) { b = a; a = choice[e]; }
              else if (choice[e] > b) { b = choice[e]; }
            }
            gscore[g] = method == 2 ? a + b : a;
            gorder[g] = g;
          }
          std::partial_sort(gorder.begin(), gorder.begin() + TG, gorder.begin() + G,
                            [&](int a, int b) { return gscore[a] > gscore[b]; });
          std::vector<char> keep(G, 0);
          for (int i = 0; i < TG; ++i) keep[gorder[i]] = 1;
          for (int e = 0; e < E; ++e)
            if (!keep[e / per]) choice[e] = -INFINITY;
        }
        for (int e = 0; e < E; ++e) order[e] = e;
        std::partial_sort(order.begin(), order.begin() + k, order.end(),
                          [&](int a, int b) { return choice[a] > choice[b]; });
        float total = 0.0f;
        for (int j = 0; j < k; ++j) total += sc[order[j]];
        for (int j = 0; j < k; ++j) {
          ip[t * k + j] = order[j];
          wp[t * k + j] = renorm ? sc[order[j]] / (total + 1e-20f) * scaling : sc[order[j]] * scaling;
        }
      }
    });
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Route&>(other);
    return sigmoid_ == o.sigmoid_ && method_ == o.method_ && groups_ == o.groups_ && topk_groups_ == o.topk_groups_ &&
           k_ == o.k_ && renorm_ == o.renorm_ && scaling_ == o.scaling_ && domains_ == o.domains_;
  }
  const char* name() const override { return "Route"; }

 private:
  bool sigmoid_;
  int method_, groups_, topk_groups_, k_;
  bool renorm_;
  float scaling_;
  bool domains_;
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


void check_float(const mx::array& x, const char* op, const char* what) {
  if (x.dtype() != mx::float32 || x.ndim() < 1) {
    throw std::invalid_argument(std::string(op) + ": " + what + " must be a float32 array with at least one axis");
  }
}

mx::array linear(const mx::array& x, const mx::array& w) {
  check_float(x, "linear", "x");
  check_float(w, "linear", "w");
  if (w.ndim() != 2 || x.shape(-1) != w.shape(1)) {
    throw std::invalid_argument("linear: x (..., in) and w (out, in)");
  }
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(shape, mx::float32, std::make_shared<Linear>(mx::to_stream(mx::Device::cpu)), {x, w});
}

mx::array rope(const mx::array& x, const mx::array& offset, const mx::array& wavelengths, int dims, bool traditional,
               float scale) {
  check_float(x, "rope", "x");
  check_float(wavelengths, "rope", "wavelengths");
  if (x.ndim() < 2 || dims % 2 || dims > x.shape(-1) || wavelengths.size() != static_cast<size_t>(dims / 2) ||
      offset.size() != 1 || offset.dtype() != mx::int32) {
    throw std::invalid_argument("rope: x (..., L, >= dims), even dims, wavelengths (dims / 2,), int32 scalar offset");
  }
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<Rope>(mx::to_stream(mx::Device::cpu), dims, traditional, scale, false),
                   {x, offset, wavelengths});
}

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  check_float(x, "rms_norm", "x");
  check_float(w, "rms_norm", "w");
  if (w.ndim() != 1 || w.shape(0) != x.shape(-1)) throw std::invalid_argument("rms_norm: x (..., D) and w (D,)");
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(mx::to_stream(mx::Device::cpu), eps), {x, w});
}


mx::array mla_absorbed(const mx::array& q_nope, const mx::array& q_pe, const mx::array& latent, const mx::array& k_pe,
                       const mx::array& w, const mx::array& mask, int mode, float scale, int v_dim) {
  for (auto* a : {&q_nope, &q_pe, &latent, &k_pe, &w}) check_float(*a, "mla_absorbed", "q, cache and kv_b weight");
  const int B = q_nope.ndim() == 4 ? q_nope.shape(0) : -1, H = q_nope.shape(1), L = q_nope.shape(2);
  const int n = q_nope.shape(3), S = latent.shape(2), r = latent.shape(3);
  if (q_nope.ndim() != 4 || q_pe.ndim() != 4 || latent.ndim() != 4 || k_pe.ndim() != 4 || w.ndim() != 2 ||
      q_pe.shape(0) != B || q_pe.shape(1) != H || q_pe.shape(2) != L || latent.shape(0) != B || latent.shape(1) != 1 ||
      k_pe.shape(0) != B || k_pe.shape(1) != 1 || k_pe.shape(2) != S || k_pe.shape(3) != q_pe.shape(3) ||
      w.shape(0) != H * (n + v_dim) || w.shape(1) != r || mode < 0 || mode > 2) {
    throw std::invalid_argument("mla_absorbed: q_nope (B, H, L, n), q_pe (B, H, L, p), latent (B, 1, S, r), "
                                "k_pe (B, 1, S, p), w (H * (n + v), r), mode 0 (all), 1 (causal) or 2 (mask)");
  }
  if (mode == 2 && (mask.dtype() != mx::bool_ || mask.ndim() != 4 || (mask.shape(0) != 1 && mask.shape(0) != B) ||
                    mask.shape(1) != 1 || mask.shape(2) != L || mask.shape(3) != S)) {
    throw std::invalid_argument("mla_absorbed: mask must be bool (B or 1, 1, L, S)");
  }
  return mx::array({B, H, L, v_dim}, mx::float32,
                   std::make_shared<MlaAbsorbed>(mx::to_stream(mx::Device::cpu), mode, scale),
                   {q_nope, q_pe, latent, k_pe, w, mask});
}


std::vector<mx::array> route(const mx::array& logits, const mx::array& bias, const mx::array& allowed,
                             const mx::array& flag, bool domains, bool sigmoid, int method, int groups, int topk_groups,
                             int k, bool renorm, float scaling) {
  check_float(logits, "route", "logits");
  check_float(bias, "route", "bias");
  const int E = logits.shape(-1);
  if (bias.ndim() != 1 || bias.shape(0) != E || method < 0 || method > 2 || k < 1 || k > E ||
      (groups > 1 && method != 0 && (E % groups || topk_groups < 1 || topk_groups > groups ||
                                     k > topk_groups * (E / groups)))) {
    throw std::invalid_argument("route: logits (..., E), bias (E,), method 0 greedy / 1 group-limited / 2 noaux_tc, "
                                "1 <= k <= experts in the kept groups");
  }
  if (domains && (allowed.dtype() != mx::bool_ || flag.dtype() != mx::bool_ || allowed.shape() != logits.shape() ||
                  flag.size() != logits.size() / E)) {
    throw std::invalid_argument("route: with domains, allowed is bool like logits and flag bool (...,) per token");
  }
  mx::Shape ks = logits.shape();
  ks.back() = k;
  return mx::array::make_arrays({ks, ks, logits.shape()}, {mx::int32, mx::float32, mx::float32},
                                std::make_shared<Route>(mx::to_stream(mx::Device::cpu), sigmoid, method, groups,
                                                        topk_groups, k, renorm, scaling, domains),
                                {logits, bias, allowed, flag});
}

}  // namespace

NB_MODULE(_dh_native, m) {
  dhn::register_quantized(m);
  m.def("set_blas_threading", [](uintptr_t local_threads) {
    dhn::blas_local_threads = reinterpret_cast<int (*)(int)>(local_threads);
  }, nb::arg("local_threads"));
  m.def("segment_rows", &segment_rows, nb::arg("x"), nb::arg("w"), nb::arg("offsets"), nb::arg("transpose"));
  m.def("segment_outer", &segment_outer, nb::arg("a"), nb::arg("b"), nb::arg("offsets"));
  m.def("ce_forward", &ce_forward, nb::arg("logits"), nb::arg("targets"));
  m.def("linear", &linear, nb::arg("x"), nb::arg("w"));
  m.def("rope", &rope, nb::arg("x"), nb::arg("offset"), nb::arg("wavelengths"), nb::arg("dims"),
        nb::arg("traditional"), nb::arg("scale"));
  m.def("mla_absorbed", &mla_absorbed, nb::arg("q_nope"), nb::arg("q_pe"), nb::arg("latent"), nb::arg("k_pe"),
        nb::arg("w"), nb::arg("mask"), nb::arg("mode"), nb::arg("scale"), nb::arg("v_dim"));
  m.def("route", &route, nb::arg("logits"), nb::arg("bias"), nb::arg("allowed"), nb::arg("flag"), nb::arg("domains"),
        nb::arg("sigmoid"), nb::arg("method"), nb::arg("groups"),
        nb::arg("topk_groups"), nb::arg("k"), nb::arg("renorm"), nb::arg("scaling"));
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("w"), nb::arg("eps"));
  m.def("ce_backward", &ce_backward, nb::arg("logits"), nb::arg("targets"), nb::arg("lse"), nb::arg("g"));
}
