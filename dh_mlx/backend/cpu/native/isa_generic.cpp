// Portable kernels (any CPU): the reference the vector kernels are tested against, and the fallback.
#include "quantized.h"

namespace dhq {

size_t prepared_len(int K, int bits, int chunk_words) {
  if (bits != 4 || chunk_words == 0) return K;
  const size_t chunk = static_cast<size_t>(chunk_words) * 8;
  return (K + chunk - 1) / chunk * chunk;
}

void prepare_row(const float* x, int K, int bits, int group, int chunk_words, float* xp, float* sums) {
  for (int g = 0; g < K / group; ++g) {
    float s = 0.0f;
    for (int k = g * group; k < (g + 1) * group; ++k) s += x[k];
    sums[g] = s;
  }
  if (bits != 4 || chunk_words == 0) {
    std::memcpy(xp, x, sizeof(float) * K);
    return;
  }
  const int C = chunk_words, len = static_cast<int>(prepared_len(K, bits, C));
  for (int c = 0; c < len; c += 8 * C)  // chunk position j * C + l <- value c + 8 l + j
    for (int j = 0; j < 8; ++j)
      for (int l = 0; l < C; ++l) {
        const int k = c + 8 * l + j;
        xp[c + j * C + l] = k < K ? x[k] : 0.0f;
      }
}

float bias_dot(const void* b, Fmt t, const float* sums, int n) {
  float acc = 0.0f;
  for (int g = 0; g < n; ++g) acc += load_f(b, t, g) * sums[g];
  return acc;
}

namespace {

// The `per` values of one packed word (a whole number of words per group: group >= 32 values).
template <int BITS>
inline void unpack(uint32_t word, float* out) {
  constexpr int per = 32 / BITS;
  for (int j = 0; j < per; ++j) out[j] = static_cast<float>((word >> (j * BITS)) & ((1u << BITS) - 1));
}

template <int BITS>
void qdot_bits(const QMat& m, const Prepared& x, int n0, int n1, float* y, size_t yld) {
  constexpr int per = 32 / BITS;
  const int groups = m.K / m.group, words = m.group / per;
  float q[per];
  for (int n = n0; n < n1; ++n) {
    const uint32_t* row = m.w + n * m.wrow();
    const size_t so = n * m.srow();
    for (int r = 0; r < x.M; ++r) {
      const float* xr = x.x + r * x.ld;
      float acc = 0.0f;
      for (int g = 0; g < groups; ++g) {
        float d = 0.0f;
        for (int i = 0; i < words; ++i) {
          unpack<BITS>(row[g * words + i], q);
          const float* xi = xr + (g * words + i) * per;
          for (int j = 0; j < per; ++j) d += xi[j] * q[j];
        }
        acc += load_f(m.s, m.st, so + g) * d;
      }
      const char* b = static_cast<const char*>(m.b) + so * fmt_size(m.st);
      y[r * yld + n] = acc + bias_dot(b, m.st, x.sums + r * x.sums_ld, groups);
    }
  }
}

template <int BITS>
void dequant_bits(const QMat& m, int n0, int n1, float* out) {
  constexpr int per = 32 / BITS;
  const int words = m.group / per;
  float q[per];
  for (int n = n0; n < n1; ++n) {
    const uint32_t* row = m.w + n * m.wrow();
    float* o = out + static_cast<size_t>(n - n0) * m.K;
    for (int g = 0; g < m.K / m.group; ++g) {
      const float s = load_f(m.s, m.st, n * m.srow() + g), b = load_f(m.b, m.st, n * m.srow() + g);
      for (int i = 0; i < words; ++i) {
        unpack<BITS>(row[g * words + i], q);
        for (int j = 0; j < per; ++j) o[(g * words + i) * per + j] = s * q[j] + b;
      }
    }
  }
}

void qdot(const QMat& m, const Prepared& x, int n0, int n1, float* y, size_t yld) {
  m.bits == 4 ? qdot_bits<4>(m, x, n0, n1, y, yld) : qdot_bits<8>(m, x, n0, n1, y, yld);
}

void dequant(const QMat& m, int n0, int n1, float* out) {
  m.bits == 4 ? dequant_bits<4>(m, n0, n1, out) : dequant_bits<8>(m, n0, n1, out);
}

void hdot(const HMat& m, const float* x, int M, size_t xld, int n0, int n1, float* y, size_t yld) {
  for (int n = n0; n < n1; ++n) {
    const uint16_t* row = m.w + static_cast<size_t>(n) * m.K;
    for (int r = 0; r < M; ++r) {
      float acc = 0.0f;
      for (int k = 0; k < m.K; ++k) acc += x[r * xld + k] * load_f(row, m.t, k);
      y[r * yld + n] = acc;
    }
  }
}

void hconv(const HMat& m, int n0, int n1, float* out) {
  for (int n = n0; n < n1; ++n)
    for (int k = 0; k < m.K; ++k)
      out[static_cast<size_t>(n - n0) * m.K + k] = load_f(m.w + static_cast<size_t>(n) * m.K, m.t, k);
}

}  // namespace

const Kernels kGeneric = {"portable", 0, qdot, dequant, hdot, hconv};

}  // namespace dhq
