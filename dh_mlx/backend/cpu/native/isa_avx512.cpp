// AVX-512 (F, BW, VL, DQ) kernels, compiled for that target whatever the build's -march, and chosen at run time
// only on a CPU that has it (quantized.cpp). Each call computes NB weight rows against MB activation rows at once:
// the weights are converted to float once for all MB rows, and NB * MB independent sums hide the FMA latency.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

#include "quantized.h"

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define INL inline __attribute__((always_inline))

namespace dhq {
namespace {

constexpr int kPanel = 16;  // weight rows per panel (a multiple of every row block)

// Weights stream from memory once per token; rows of a few hundred bytes are too short for the hardware
// prefetcher to ramp up, so each kernel asks for the bytes kAhead further on in the same array.
constexpr int kAhead = 4096;
inline void ahead(const void* p, int bytes = kAhead) {
  _mm_prefetch(static_cast<const char*>(p) + bytes, _MM_HINT_T0);
}

inline __mmask16 first(int n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// Up to 16 values of dtype t as float (masked-off lanes 0).
T512 INL __m512 load16(const void* p, Fmt t, __mmask16 mask) {
  if (t == kF32) return _mm512_maskz_loadu_ps(mask, p);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  if (t == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// y = the lanes of `tot` plus the biases' share, sum over groups of b * sum(x_group), in one reduction.
T512 INL void finish(const QMat& m, const Prepared& x, int n, int r, __m512 tot, float* y, size_t yld) {
  const char* b = static_cast<const char*>(m.b) + n * m.srow() * fmt_size(m.st);
  const float* sums = x.sums + r * x.sums_ld;
  const int groups = m.K / m.group;
  for (int g = 0; g < groups; g += 16) {
    const __mmask16 mk = first(groups - g);
    tot = _mm512_fmadd_ps(load16(b + g * fmt_size(m.st), m.st, mk), _mm512_maskz_loadu_ps(mk, sums + g), tot);
  }
  y[r * yld + n] = _mm512_reduce_add_ps(tot);
}

// 4 bits: lane l of a chunk holds word l; nibble j indexes the table of floats 0..15 (vpermps reads the low 4 bits).
template <int NB, int MB>
T512 INL void q4(const QMat& m, const Prepared& x, int n, int r0, float* y, size_t yld, __m512i sidx) {
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const size_t wrow = m.wrow(), srow = m.srow(), es = fmt_size(m.st);
  const int per_chunk = 128 / m.group;
  __m512 tot[NB][MB];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) tot[b][r] = _mm512_setzero_ps();
  for (int c = 0, k0 = 0; k0 < m.K; ++c, k0 += 128) {
    const int words = std::min(16, (m.K - k0) / 8);
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b) {
      wv[b] = _mm512_maskz_loadu_epi32(first(words), m.w + (n + b) * wrow + c * 16);
      ahead(m.w + (n + b) * wrow + c * 16);
      ahead(static_cast<const char*>(m.s) + ((n + b) * srow + c * per_chunk) * es, kAhead / 4);
      ahead(static_cast<const char*>(m.b) + ((n + b) * srow + c * per_chunk) * es, kAhead / 4);
    }
    __m512 acc[NB][MB];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m512 q[NB];
      for (int b = 0; b < NB; ++b) q[b] = _mm512_permutexvar_ps(_mm512_srli_epi32(wv[b], 4 * j), table);
      for (int r = 0; r < MB; ++r) {
        const __m512 xv = _mm512_loadu_ps(x.x + (r0 + r) * x.ld + k0 + j * 16);
        for (int b = 0; b < NB; ++b) acc[b][r] = j ? _mm512_fmadd_ps(q[b], xv, acc[b][r]) : _mm512_mul_ps(q[b], xv);
      }
    }
    for (int b = 0; b < NB; ++b) {
      const char* s = static_cast<const char*>(m.s) + ((n + b) * srow + c * per_chunk) * es;
      const __m512 sv = per_chunk == 1 ? _mm512_set1_ps(load_f(s, m.st, 0))
                                       : _mm512_permutexvar_ps(sidx, load16(s, m.st, first(words * 8 / m.group)));
      for (int r = 0; r < MB; ++r) tot[b][r] = _mm512_fmadd_ps(acc[b][r], sv, tot[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) finish(m, x, n + b, r0 + r, tot[b][r], y, yld);
}

// 8 bits: 16 bytes at a time zero-extended to 16 lanes; one scale per group.
template <int NB, int MB>
T512 INL void q8(const QMat& m, const Prepared& x, int n, int r0, float* y, size_t yld, __m512i) {
  const size_t wrow = m.wrow() * 4, srow = m.srow();
  const int G = m.group;
  __m512 tot[NB][MB];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) tot[b][r] = _mm512_setzero_ps();
  for (int g = 0; g < m.K / G; ++g) {
    __m512 acc[NB][MB];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < MB; ++r) acc[b][r] = _mm512_setzero_ps();
    for (int k = g * G; k < (g + 1) * G; k += 16) {
      __m512 q[NB];
      for (int b = 0; b < NB; ++b) {
        const uint8_t* p = reinterpret_cast<const uint8_t*>(m.w) + (n + b) * wrow + k;
        q[b] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
        if ((k & 63) == 0) ahead(p);
      }
      for (int r = 0; r < MB; ++r) {
        const __m512 xv = _mm512_loadu_ps(x.x + (r0 + r) * x.ld + k);
        for (int b = 0; b < NB; ++b) acc[b][r] = _mm512_fmadd_ps(q[b], xv, acc[b][r]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      ahead(static_cast<const char*>(m.s) + ((n + b) * srow + g) * fmt_size(m.st), kAhead / 4);
      ahead(static_cast<const char*>(m.b) + ((n + b) * srow + g) * fmt_size(m.st), kAhead / 4);
      const __m512 sv = _mm512_set1_ps(load_f(m.s, m.st, (n + b) * srow + g));
      for (int r = 0; r < MB; ++r) tot[b][r] = _mm512_fmadd_ps(acc[b][r], sv, tot[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) finish(m, x, n + b, r0 + r, tot[b][r], y, yld);
}

// Rows n0..n1 against activation rows r0..r0+MB: NB rows at a time, then one at a time.
template <int MB, bool FOUR>
T512 void q_rows(const QMat& m, const Prepared& x, int n0, int n1, int r0, float* y, size_t yld, __m512i sidx) {
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
T512 void q_all(const QMat& m, const Prepared& x, int n0, int n1, float* y, size_t yld) {
  // lane l of a 4-bit chunk holds values 8 l .. 8 l + 7: its scale is the chunk's (8 l / group)-th
  const int shift = m.group == 32 ? 5 : m.group == 64 ? 6 : 7;
  const __m512i sidx = _mm512_srl_epi32(_mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                             13, 14, 15), 3),
                                        _mm_cvtsi32_si128(shift));
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

T512 void qdot(const QMat& m, const Prepared& x, int n0, int n1, float* y, size_t yld) {
  m.bits == 4 ? q_all<true>(m, x, n0, n1, y, yld) : q_all<false>(m, x, n0, n1, y, yld);
}

T512 void dequant(const QMat& m, int n0, int n1, float* out) {
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = reinterpret_cast<const uint8_t*>(m.w + n * m.wrow());
    float* o = out + static_cast<size_t>(n - n0) * m.K;
    for (int k = 0; k < m.K; k += 32) {  // groups are >= 32 values: one scale and bias per 32
      const size_t g = n * m.srow() + k / m.group;
      const __m512 s = _mm512_set1_ps(load_f(m.s, m.st, g)), b = _mm512_set1_ps(load_f(m.b, m.st, g));
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
      for (int h = 0; h < 2; ++h)
        _mm512_storeu_ps(o + k + 16 * h, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v[h])), s, b));
    }
  }
}

template <int NB, int MB>
T512 INL void h_rows(const HMat& m, const float* x, size_t xld, int n, int r0, float* y, size_t yld) {
  __m512 acc[NB][MB];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int k = 0; k < m.K; k += 16) {
    const __mmask16 mk = first(m.K - k);
    __m512 w[NB];
    for (int b = 0; b < NB; ++b) {
      w[b] = load16(m.w + static_cast<size_t>(n + b) * m.K + k, m.t, mk);
      if ((k & 31) == 0) ahead(m.w + static_cast<size_t>(n + b) * m.K + k);
    }
    for (int r = 0; r < MB; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + (r0 + r) * xld + k);
      for (int b = 0; b < NB; ++b) acc[b][r] = _mm512_fmadd_ps(w[b], xv, acc[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MB; ++r) y[(r0 + r) * yld + n + b] = _mm512_reduce_add_ps(acc[b][r]);
}

template <int MB>
T512 void h_block(const HMat& m, const float* x, size_t xld, int n0, int n1, int r0, float* y, size_t yld) {
  constexpr int NB = MB <= 2 ? 4 : 2;
  int n = n0;
  for (; n + NB <= n1; n += NB) h_rows<NB, MB>(m, x, xld, n, r0, y, yld);
  for (; n < n1; ++n) h_rows<1, MB>(m, x, xld, n, r0, y, yld);
}

T512 void hdot(const HMat& m, const float* x, int M, size_t xld, int n0, int n1, float* y, size_t yld) {
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

T512 void hconv(const HMat& m, int n0, int n1, float* out) {
  const size_t total = static_cast<size_t>(n1 - n0) * m.K;
  const uint16_t* w = m.w + static_cast<size_t>(n0) * m.K;
  for (size_t i = 0; i < total; i += 16)
    _mm512_mask_storeu_ps(out + i, first(static_cast<int>(std::min<size_t>(16, total - i))),
                          load16(w + i, m.t, first(static_cast<int>(std::min<size_t>(16, total - i)))));
}

}  // namespace

const Kernels kAvx512 = {"avx512", 16, qdot, dequant, hdot, hconv};

}  // namespace dhq
#endif
