// Dropout on the CPU from a counter-based random stream (grnn_fairseq/dropout.py):
//
//   y_e = x_e * keep_e / (1 - p)      keep_e = [u_e < t],  t = round((1 - p) 2^32)
//
// u_e is a word of Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random
// numbers: as easy as 1, 2, 3"; 10 rounds, the multipliers and key increments of its
// paper) under the 64-bit key `seed`.  Element e of block b = e / 64 takes word w =
// (e % 64) / 16 of counter 16 b + e % 16 (counter words: its low and high 32 bits, 0, 0):
// 16 counters side by side, so the rounds vectorise.  keep_e is a function of (seed, e)
// alone: the backward recomputes the mask instead of storing it, and the result does not
// depend on the number of threads.  torch's CPU bernoulli_ draws one number at a time from
// a single generator (about 8 ns an element here), which made dropout about 6% of an
// RNNSearch training step.  x * 0 keeps a NaN of x, as x * mask does.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

#include "cpu_math.h"

namespace {

using at::Tensor;

constexpr uint32_t PHILOX_M0 = 0xD2511F53u, PHILOX_M1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u, PHILOX_W1 = 0xBB67AE85u;  // key increments
constexpr int64_t LANES = 16;          // counters per block
constexpr int64_t BLOCK = 4 * LANES;   // elements per block

// the 4 words of the 16 counters 16 block .. 16 block + 15, words[w][j]; the loop over the
// counters vectorises (the rounds unrolled inside it, a 32 x 32 -> 64-bit product per lane)
GRNN_INLINE void philox_block(uint64_t block, uint32_t key0, uint32_t key1,
                              uint32_t (&words)[4][LANES]) {
  for (int j = 0; j < LANES; ++j) {
    const uint64_t c = block * LANES + j;
    uint32_t c0 = uint32_t(c), c1 = uint32_t(c >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = key0, k1 = key1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = uint64_t(PHILOX_M0) * c0, p1 = uint64_t(PHILOX_M1) * c2;
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
      c1 = uint32_t(p1), c3 = uint32_t(p0), c0 = n0, c2 = n2;
      k0 += PHILOX_W0, k1 += PHILOX_W1;
    }
    words[0][j] = c0, words[1][j] = c1, words[2][j] = c2, words[3][j] = c3;
  }
}

// y[e] = x[e] * (keep_e ? scale : 0) for e in [b0 * BLOCK, min(b1 * BLOCK, n))
template <typename T>
GRNN_INLINE void apply_blocks(const T* x, T* y, int64_t n, int64_t b0, int64_t b1,
                              uint32_t k0, uint32_t k1, uint32_t threshold, T scale) {
  uint32_t words[4][LANES];
  for (int64_t b = b0; b < b1; ++b) {
    philox_block(uint64_t(b), k0, k1, words);
    const int64_t base = b * BLOCK;
    if (base + BLOCK <= n) {
      for (int w = 0; w < 4; ++w) {
        const T* xw = x + base + w * LANES;
        T* yw = y + base + w * LANES;
        GRNN_IVDEP
        for (int j = 0; j < LANES; ++j) yw[j] = xw[j] * (words[w][j] < threshold ? scale : T(0));
      }
    } else {  // the last, partial block
      for (int64_t e = base; e < n; ++e) {
        const int64_t i = e - base;
        y[e] = x[e] * (words[i / LANES][i % LANES] < threshold ? scale : T(0));
      }
    }
  }
}

#define GRNN_DROPOUT(T, t)                                                                  \
  GRNN_CLONES void apply_##t(const T* x, T* y, int64_t n, int64_t b0, int64_t b1,           \
                             uint32_t k0, uint32_t k1, uint32_t threshold, T scale) {       \
    apply_blocks<T>(x, y, n, b0, b1, k0, k1, threshold, scale);                             \
  }
GRNN_DROPOUT(float, f)
GRNN_DROPOUT(double, d)
#undef GRNN_DROPOUT
inline void apply(const float* x, float* y, int64_t n, int64_t b0, int64_t b1, uint32_t k0,
                  uint32_t k1, uint32_t threshold, float scale) {
  apply_f(x, y, n, b0, b1, k0, k1, threshold, scale);
}
inline void apply(const double* x, double* y, int64_t n, int64_t b0, int64_t b1, uint32_t k0,
                  uint32_t k1, uint32_t threshold, double scale) {
  apply_d(x, y, n, b0, b1, k0, k1, threshold, scale);
}

// x * keep / (1 - p) with the mask of `seed` (the same seed gives the same mask: the
// backward calls this on the output's gradient).  p in (0, 1); x float32 or float64.
Tensor seeded_dropout(const Tensor& x, double p, int64_t seed) {
  TORCH_CHECK(x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "dropout_cpu: float32 or float64 CPU tensors only");
  TORCH_CHECK(p > 0 && p < 1, "dropout_cpu: p must be in (0, 1)");
  const Tensor xc = x.contiguous();
  Tensor y = at::empty_like(xc);
  const int64_t n = xc.numel();
  const double kept = std::round((1 - p) * 4294967296.0);
  const uint32_t threshold = kept >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(kept);
  const uint32_t k0 = uint32_t(uint64_t(seed)), k1 = uint32_t(uint64_t(seed) >> 32);
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "seeded_dropout", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t scale = scalar_t(1.0 / (1.0 - p));
    // blocks per task: ~16k elements, so that a decoder step's small tensors stay serial
    at::parallel_for(0, blocks, 256, [&](int64_t b0, int64_t b1) {
      apply(xp, yp, n, b0, b1, k0, k1, threshold, scale);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(grnn_rnn_cpu, lib) {
  lib.def("seeded_dropout(Tensor x, float p, int seed) -> Tensor", &seeded_dropout);
}
