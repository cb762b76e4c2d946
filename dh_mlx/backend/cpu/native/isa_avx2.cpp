// AVX2 + FMA + F16C kernels, compiled for that target whatever the build's -march, and chosen at run time on a
// CPU that has them but not AVX-512 (quantized.cpp). Same blocking as isa_avx512.cpp, 8 lanes: a 4-bit nibble
// is shifted down, masked and converted (AVX2 has no 16-entry float permute).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

#include "quantized.h"

#define T2 __attribute__((target("avx2,fma,f16c")))
#define INL inline __attribute__((always_inline))

namespace dhq {
namespace {

constexpr int kPanel = 16;  // weight rows per panel (a multiple of every row block)

constexpr int kAhead = 4096;  // software prefetch distance (see isa_avx512.cpp)
inline void ahead(const void* p, int bytes = kAhead) {
  _mm_prefetch(static_cast<const char*>(p) + bytes, _MM_HINT_T0);
}

// 8 values of dtype t as float.
T2 INL __m256 load8(const void* p, Fmt t) {
  if (t == kF32) return _mm256_loadu_ps(static_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  if (t == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

T2 INL float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

T2 INL void finish(const QMat& m, const Prepared& x, int n, int r, float dot, float* y, size_t yld) {
  const char* b = static_cast<const char*>(m.b) + n * m.srow() * fmt_size(m.st);
  y[r * yld + n] = dot + bias_dot(b, m.st, x.sums + r * x.sums_ld, m.K / m.group);
}

// 4 bits: lane l of a 64-value chunk holds word l; its nibble j is value 8 l + j.
template <int NB, int MB>
T2 INL void q4(const QMat& m, const Prepared& x, int n, int r0, float* y, size_t yld, __m256i) {
  const __m256i low = _mm256_set1_epi32(0xF), half = _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0);
  const size_t wrow = m.wrow(), srow = m.srow();
  __m256 tot[NB][MB];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) tot[b][r] = _mm256_setzero_ps();
  for (int c = 0, k0 = 0; k0 < m.K; ++c, k0 += 64) {
    const bool full = m.K - k0 >= 64;  // else 32 values: 4 words
    __m256i wv[NB];
    for (int b = 0; b < NB; ++b) {
      const uint32_t* p = m.w + (n + b) * wrow + c * 8;
      wv[b] = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                   : _mm256_maskload_epi32(reinterpret_cast<const int*>(p), half);
      if ((c & 1) == 0) ahead(p);
      ahead(static_cast<const char*>(m.s) + ((n + b) * srow + k0 / m.group) * fmt_size(m.st), kAhead / 4);
      ahead(static_cast<const char*>(m.b) + ((n + b) * srow + k0 / m.group) * fmt_size(m.st), kAhead / 4);
    }
    __m256 acc[NB][MB];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m256 q[NB];
      for (int b = 0; b < NB; ++b) q[b] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(wv[b], 4 * j), low));
      for (int r = 0; r < MB; ++r) {
        const __m256 xv = _mm256_loadu_ps(x.x + (r0 + r) * x.ld + k0 + j * 8);
        for (int b = 0; b < NB; ++b) acc[b][r] = j ? _mm256_fmadd_ps(q[b], xv, acc[b][r]) : _mm256_mul_ps(q[b], xv);
      }
    }
    const int g0 = k0 / m.group;
    for (int b = 0; b < NB; ++b) {  // lanes 0-3 and 4-7 take one scale each (two for group 32: two groups)
      const size_t i = (n + b) * srow + g0;
      const float s0 = load_f(m.s, m.st, i), s1 = m.group == 32 && full ? load_f(m.s, m.st, i + 1) : s0;
      const __m256 sv = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
      for (int r = 0; r < MB; ++r) tot[b][r] = _mm256_fmadd_ps(acc[b][r], sv, tot[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) finish(m, x, n + b, r0 + r, hsum(tot[b][r]), y, yld);
}

template <int NB, int MB>
T2 INL void q8(const QMat& m, const Prepared& x, int n, int r0, float* y, size_t yld, __m256i) {
  const size_t wrow = m.wrow() * 4, srow = m.srow();
  const int G = m.group;
  __m256 tot[NB][MB];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) tot[b][r] = _mm256_setzero_ps();
  for (int g = 0; g < m.K / G; ++g) {
    __m256 acc[NB][MB];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < MB; ++r) acc[b][r] = _mm256_setzero_ps();
    for (int k = g * G; k < (g + 1) * G; k += 8) {
      __m256 q[NB];
      for (int b = 0; b < NB; ++b) {
        const uint8_t* p = reinterpret_cast<const uint8_t*>(m.w) + (n + b) * wrow + k;
        q[b] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
        if ((k & 63) == 0) ahead(p);
      }
      for (int r = 0; r < MB; ++r) {
        const __m256 xv = _mm256_loadu_ps(x.x + (r0 + r) * x.ld + k);
        for (int b = 0; b < NB; ++b) acc[b][r] = _mm256_fmadd_ps(q[b], xv, acc[b][r]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      ahead(static_cast<const char*>(m.s) + ((n + b) * srow + g) * fmt_size(m.st), kAhead / 4);
      ahead(static_cast<const char*>(m.b) + ((n + b) * srow + g) * fmt_size(m.st), kAhead / 4);
      const __m256 sv = _mm256_set1_ps(load_f(m.s, m.st, (n + b) * srow + g));
      for (int r = 0; r < MB; ++r) tot[b][r] = _mm256_fmadd_ps(acc[b][r], sv, tot[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) finish(m, x, n + b, r0 + r, hsum(tot[b][r]), y, yld);
}

template <int MB, bool FOUR>
T2 void q_rows(const QMat& m, const Prepared& x, int n0, int n1, int r0, float* y, size_t yld, __m256i sidx) {
  constexpr int NB = MB <= 2 ? 4 : 2;
  int n = n0;
  for (; n + NB <= n1; n += NB) {
    if constexpr (FOUR) q4<NB, MB>(m, x, n, r0, y, yld, sidx);
    else q8<NB, MB>(m, x, n, r0, y, yld, sidx);
  }
  for (; n < n1; ++n) {
    if constexpr (FOUR) q4<1, MB>(m, x, n, r0, y, yld, sidx);
    else q8<1, MB>(m, x, n, r0, y, yld, sidx);
  }
}

template <bool FOUR>
T2 void q_all(const QMat& m, const Prepared& x, int n0, int n1, float* y, size_t yld) {
  const int shift = m.group == 32 ? 5 : m.group == 64 ? 6 : 7;  // lane l's scale: the chunk's (8 l / group)-th
  const __m256i sidx = _mm256_srl_epi32(_mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56), _mm_cvtsi32_si128(shift));
  for (int p0 = n0; p0 < n1; p0 += kPanel) {  // a panel of weight rows stays in cache for every activation row
    const int p1 = std::min(n1, p0 + kPanel);
    int r = 0;
    for (; r + 4 <= x.M; r += 4) q_rows<4, FOUR>(m, x, p0, p1, r, y, yld, sidx);
    switch (x.M - r) {
      case 3: q_rows<3, FOUR>(m, x, p0, p1, r, y, yld, sidx); break;
      case 2: q_rows<2, FOUR>(m, x, p0, p1, r, y, yld, sidx); break;
      case 1: q_rows<1, FOUR>(m, x, p0, p1, r, y, yld, sidx); break;
    }
  }
}

T2 void qdot(const QMat& m, const Prepared& x, int n0, int n1, float* y, size_t yld) {
  m.bits == 4 ? q_all<true>(m, x, n0, n1, y, yld) : q_all<false>(m, x, n0, n1, y, yld);
}

T2 void dequant(const QMat& m, int n0, int n1, float* out) {
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = reinterpret_cast<const uint8_t*>(m.w + n * m.wrow());
    float* o = out + static_cast<size_t>(n - n0) * m.K;
    for (int k = 0; k < m.K; k += 32) {
      const size_t g = n * m.srow() + k / m.group;
      const __m256 s = _mm256_set1_ps(load_f(m.s, m.st, g)), b = _mm256_set1_ps(load_f(m.b, m.st, g));
      __m128i v[2];
      ahead(row + k * m.bits / 8);
      if (m.bits == 4) {
        const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
        const __m128i lo = _mm_and_si128(p, low), hi = _mm_and_si128(_mm_srli_epi16(p, 4), low);
        v[0] = _mm_unpacklo_epi8(lo, hi);
        v[1] = _mm_unpackhi_epi8(lo, hi);
      } else {
        v[0] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
        v[1] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16));
      }
      for (int h = 0; h < 4; ++h) {
        const __m128i part = h & 1 ? _mm_srli_si128(v[h / 2], 8) : v[h / 2];
        _mm256_storeu_ps(o + k + 8 * h, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part)), s, b));
      }
    }
  }
}

template <int NB, int MB>
T2 INL void h_rows(const HMat& m, const float* x, size_t xld, int n, int r0, float* y, size_t yld) {
  __m256 acc[NB][MB];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) acc[b][r] = _mm256_setzero_ps();
  const int K8 = m.K / 8 * 8;
  for (int k = 0; k < K8; k += 8) {
    __m256 w[NB];
    for (int b = 0; b < NB; ++b) {
      w[b] = load8(m.w + static_cast<size_t>(n + b) * m.K + k, m.t);
      if ((k & 31) == 0) ahead(m.w + static_cast<size_t>(n + b) * m.K + k);
    }
    for (int r = 0; r < MB; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + (r0 + r) * xld + k);
      for (int b = 0; b < NB; ++b) acc[b][r] = _mm256_fmadd_ps(w[b], xv, acc[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) {
      float s = hsum(acc[b][r]);
      for (int k = K8; k < m.K; ++k) s += x[(r0 + r) * xld + k] * load_f(m.w + static_cast<size_t>(n + b) * m.K, m.t, k);
      y[(r0 + r) * yld + n + b] = s;
    }
}

template <int MB>
T2 void h_block(const HMat& m, const float* x, size_t xld, int n0, int n1, int r0, float* y, size_t yld) {
  constexpr int NB = MB <= 2 ? 4 : 2;
  int n = n0;
  for (; n + NB <= n1; n += NB) h_rows<NB, MB>(m, x, xld, n, r0, y, yld);
  for (; n < n1; ++n) h_rows<1, MB>(m, x, xld, n, r0, y, yld);
}

T2 void hdot(const HMat& m, const float* x, int M, size_t xld, int n0, int n1, float* y, size_t yld) {
  for (int p0 = n0; p0 < n1; p0 += kPanel) {
    const int p1 = std::min(n1, p0 + kPanel);
    int r = 0;
    for (; r + 4 <= M; r += 4) h_block<4>(m, x, xld, p0, p1, r, y, yld);
    switch (M - r) {
      case 3: h_block<3>(m, x, xld, p0, p1, r, y, yld); break;
      case 2: h_block<2>(m, x, xld, p0, p1, r, y, yld); break;
      case 1: h_block<1>(m, x, xld, p0, p1, r, y, yld); break;
    }
  }
}

T2 void hconv(const HMat& m, int n0, int n1, float* out) {
  const size_t total = static_cast<size_t>(n1 - n0) * m.K, t8 = total / 8 * 8;
  const uint16_t* w = m.w + static_cast<size_t>(n0) * m.K;
  for (size_t i = 0; i < t8; i += 8) _mm256_storeu_ps(out + i, load8(w + i, m.t));
  for (size_t i = t8; i < total; ++i) out[i] = load_f(w, m.t, i);
}

}  // namespace

const Kernels kAvx2 = {"avx2", 8, qdot, dequant, hdot, hconv};

}  // namespace dhq
#endif
