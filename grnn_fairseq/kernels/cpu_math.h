// Math shared by the C++ CPU kernels (rnn_cpu.cpp, attention_cpu.cpp): the vector clones,
// and exp / sigmoid / tanh in plain arithmetic, so that the loops calling them vectorise.
#pragma once

#include <cstdint>
#include <cstring>

namespace grnn {

// Clones of the pointwise loops for wider vector units, picked when the library loads.
#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__) && !defined(GRNN_NO_CLONES)
#define GRNN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GRNN_CLONES
#endif
#define GRNN_INLINE inline __attribute__((always_inline))
// the loops over the m units of a row carry no dependence (they read and write separate
// rows and gate blocks): tell the vectoriser, whose alias checks would give up
#if defined(__clang__)
#define GRNN_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define GRNN_IVDEP _Pragma("GCC ivdep")
#else
#define GRNN_IVDEP
#endif

template <typename To, typename From>
GRNN_INLINE To bit_cast(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
}

// exp(x), x clamped to the range of normal results: plain arithmetic (no library call),
// so that the loops below vectorise.  n = round(x / ln2) by the 1.5 * 2^p trick, the
// remainder r = x - n ln2 (|r| <= ln2 / 2) in two parts, a Taylor polynomial for e^r
// (relative error < 1e-7 in float, < 3e-16 in double) and 2^n built in the exponent bits.
GRNN_INLINE float exp_(float x) {
  x = x < -87.0f ? -87.0f : x;  // NaN passes through
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (bit_cast<int32_t>(t) - bit_cast<int32_t>(magic) + 127) << 23;
  return p * bit_cast<float>(e);
}

GRNN_INLINE double exp_(double x) {
  x = x < -708.0 ? -708.0 : x;
  x = x > 709.0 ? 709.0 : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * 1.4426950408889634074 + magic;
  const double n = t - magic;
  double r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  double p = 1.0 / 479001600;
  p = p * r + 1.0 / 39916800;
  p = p * r + 1.0 / 3628800;
  p = p * r + 1.0 / 362880;
  p = p * r + 1.0 / 40320;
  p = p * r + 1.0 / 5040;
  p = p * r + 1.0 / 720;
  p = p * r + 1.0 / 120;
  p = p * r + 1.0 / 24;
  p = p * r + 1.0 / 6;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t e = (bit_cast<int64_t>(t) - bit_cast<int64_t>(magic) + 1023) << 52;
  return p * bit_cast<double>(e);
}

template <typename T>
GRNN_INLINE T sigmoid_(T x) {
  return T(1) / (T(1) + exp_(-x));
}

template <typename T>
GRNN_INLINE T tanh_(T x) {  // 2 sigmoid(2x) - 1
  return T(2) / (T(1) + exp_(T(-2) * x)) - T(1);
}

}  // namespace grnn
