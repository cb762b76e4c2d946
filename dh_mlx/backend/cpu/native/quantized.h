// Weight formats the quantized / half-precision kernels read, and the per-instruction-set kernel tables.
//
// MLX's affine format: a row of K weights is K * bits / 32 uint32 words, value k at bits (k * bits) % 32 of word
// k * bits / 32 (least significant first), and per group of `group` values a scale s and a bias b (the model's
// float dtype): w = s * q + b. So x . w_row = sum over groups of s * (x_g . q_g) + b * sum(x_g): the sum of each
// activation group is computed once per activation row, and the inner loop only converts q to float and FMAs.
//
// 4-bit kernels read the words whole: lane l of a vector holds word l (8 values), and its nibble j, shifted down,
// indexes a 16-entry table of the floats 0..15 (AVX-512 vpermps) or is masked and converted (AVX2). The activation
// row is permuted once to match ("prepared"): in each chunk of C words, position j * C + l holds x[chunk + 8 l + j].
// Every kernel accumulates in float32; nothing is rounded but the final output.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace dhq {

enum Fmt : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline size_t fmt_size(Fmt t) { return t == kF32 ? 4 : 2; }

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float f16_to_f32(uint16_t h);  // IEEE half (portable; quantized.cpp)

inline float load_f(const void* p, Fmt t, size_t i) {
  if (t == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return t == kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// One [N, K] matrix in MLX's affine format (a stack's e-th: pointers already offset).
struct QMat {
  const uint32_t* w;
  const void* s;
  const void* b;
  Fmt st;  // scales' and biases' dtype
  int bits, group, N, K;
  size_t wrow() const { return static_cast<size_t>(K) * bits / 32; }
  size_t srow() const { return static_cast<size_t>(K / group); }
};

// One [N, K] matrix of bfloat16 or float16 weights.
struct HMat {
  const uint16_t* w;
  Fmt t;
  int N, K;
};

// Prepared activations for one quantized matrix: M rows of `ld` floats (the permuted layout for 4 bits) and M
// rows of K / group group sums.
struct Prepared {
  const float* x;
  size_t ld;
  const float* sums;
  size_t sums_ld;
  int M;
};

struct Kernels {
  const char* name;
  int chunk_words;  // 4-bit prepared layout: words per chunk (0: natural order)
  // y[m * yld + n] = x_m . row n (float32), rows n0 <= n < n1, every prepared row m.
  void (*qdot)(const QMat& m, const Prepared& x, int n0, int n1, float* y, size_t yld);
  // Rows n0 <= n < n1 as float32, natural order: out[(n - n0) * K + k].
  void (*dequant)(const QMat& m, int n0, int n1, float* out);
  // y[r * yld + n] = x_r . row n for M activation rows of stride xld (float32).
  void (*hdot)(const HMat& m, const float* x, int M, size_t xld, int n0, int n1, float* y, size_t yld);
  void (*hconv)(const HMat& m, int n0, int n1, float* out);
};

extern const Kernels kGeneric;
#if defined(__x86_64__) || defined(_M_X64)
extern const Kernels kAvx2;
extern const Kernels kAvx512;
#endif

// Padded length of a prepared activation row, and the preparation itself (K a multiple of `group`).
size_t prepared_len(int K, int bits, int chunk_words);
void prepare_row(const float* x, int K, int bits, int group, int chunk_words, float* xp, float* sums);

// sum over g < n of b[g] * sums[g] (the biases' share of a row's dot product).
float bias_dot(const void* b, Fmt t, const float* sums, int n);

}  // namespace dhq
