// Fused CPU loops of the group recurrences (LSTM, GRU, Elman RNN): backend ``cpp`` of
// grnn_fairseq.engine.
//
// The math, the inputs, the outputs and the gradients are those of the reference loop
// (for the LSTM, of engine.LSTMScan, backend ``torch``).  Each time step is one batched
// product of the K groups (at::bmm_out into a preallocated buffer) and ONE pointwise pass
// (at::parallel_for over the batch rows; per row the K groups of m units: gates, cell,
// output, the factors the backward needs, masking, and the time shuffle written into the
// next product's operand).  The backward is the mirror image: one pass, then one product
// per step.  The pointwise loops vectorise (exp in plain arithmetic) and are cloned for
// AVX2 / AVX-512.  The fp32 forward has a one-pass step (below, "fused forward").
//
// Shapes (H = K*m, G gate rows per unit: LSTM 4, GRU 3, RNN 1):  gx [T, K, B, Gm] (any
// strides, unit stride along the gates) or the K groups' [T, B, Gm] apart (the input
// projections as oneDNN returns them, one tensor per group: no copy into one tensor),
// h0 / c0 [K, B, m] (c0: LSTM only),
// weight_hh [K, Gm, m], bias_hh [K, Gm], mask [T, B] (true: token).
// Hidden states are flat [B, H] rows: hu[s] in unit order (unit j of group k at column
// k*m + j), hs[s] in the time-shuffled order that the next product reads (the same unit
// at column j*K + k, rearrangement.rearrange); hs is hu without the shuffle.  Slot
// s = t + 1 holds the state after step t, slot 0 (forward) or T + 1 (reverse) the initial
// state.  fac [K, T, B, Fm], per step and row: the factors that map the gradient of h_t
// (and of c_t) to the gate gradients and on to step t-1 (F per cell: see the cells).
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_math.h"

namespace {

using at::Tensor;
using namespace grnn;

// The cells (their order: PyTorch's gates; kinds as engine passes them)
enum CellKind : int64_t { kLSTM = 0, kGRU = 1, kRNN = 2 };
constexpr int64_t gates_of(int64_t c) { return c == kLSTM ? 4 : c == kGRU ? 3 : 1; }
constexpr int64_t factors_of(int64_t c) { return c == kLSTM ? 6 : c == kGRU ? 5 : 1; }

// ----------------------------------------------------------------------------- forward
template <typename T>
struct Fwd {               // one step
  const T* pre;            // [K, B, Gm] recurrent product of the step (no bias)
  const T* const* gx;      // gx[t]: row (k, b) at gx[k] + b * gx_sb
  int64_t gx_sb;
  const T* bias;           // [K, Gm]
  const T* c_prev;         // [K, B, m] (LSTM)
  T* c_new;                // [K, B, m] (LSTM)
  const T* h_prev;         // [B, H] unit order
  T* h_new;                // [B, H] unit order
  T* hs_new;               // [B, H] shuffled order, or null (no shuffle)
  T* out;                  // [B, H] output of the step, or null (it is h_new)
  T* fac;                  // fac[:, t] (row (k, b) at k * fac_sk + b * Fm), or null
  int64_t fac_sk;
  const bool* keep;        // mask[t] ([B]), or null
  int64_t K, B, m;
};

// The LSTM (Hochreiter & Schmidhuber; gates i, f, g, o) on n units of one row (restrict
// parameters: the loop vectorises).  F = 6 factors: g i(1-i), c_prev f(1-f), i(1-g^2),
// tanh(c) o(1-o), o(1-tanh(c)^2), f.
// pr / xr / br: product, input projection, bias of the 4 gates, gate g of unit j at
// [g * ps + j] (pr) and [g * m + j] (xr, br); cp / cn: c before / after; hn: h after;
// fr: the 6 backward factors at [f * m + j] (SAVE).  A whole row: n = ps = m.
template <typename T, bool SAVE>
GRNN_INLINE void lstm_cell(int64_t n, int64_t ps, int64_t m, const T* __restrict pr,
                              const T* __restrict xr, const T* __restrict br,
                              const T* __restrict cp, T* __restrict cn, T* __restrict hn,
                              T* __restrict fr) {
  GRNN_IVDEP
  for (int64_t j = 0; j < n; ++j) {
    const T i = sigmoid_(pr[j] + xr[j] + br[j]);
    const T f = sigmoid_(pr[ps + j] + xr[m + j] + br[m + j]);
    const T g = tanh_(pr[2 * ps + j] + xr[2 * m + j] + br[2 * m + j]);
    const T o = sigmoid_(pr[3 * ps + j] + xr[3 * m + j] + br[3 * m + j]);
    const T c_prev = cp[j];
    const T c = f * c_prev + i * g;
    const T tc = tanh_(c);
    cn[j] = c;
    hn[j] = o * tc;
    if constexpr (SAVE) {
      fr[j] = g * i * (T(1) - i);
      fr[m + j] = c_prev * f * (T(1) - f);
      fr[2 * m + j] = i * (T(1) - g * g);
      fr[3 * m + j] = tc * o * (T(1) - o);
      fr[4 * m + j] = o * (T(1) - tc * tc);
      fr[5 * m + j] = f;
    }
  }
}

// The GRU (Cho et al. 2014 in PyTorch's form; gates r, z, n) on n units of one row:
// r = s(p_r + x_r + b_r), z = s(p_z + x_z + b_z), n = tanh(x_n + r (p_n + b_n)),
// h = n + z (h_{t-1} - n), with p the recurrent product (of the shuffled operand; gate g of
// unit j at [g * ps + j]) and hp the unit's own h_{t-1}.  F = 5 factors:
// (h_{t-1} - n) z(1-z), (1-z)(1-n^2), (p_n + b_n) r(1-r), r, z.  A whole row: n = ps = m.
template <typename T, bool SAVE>
GRNN_INLINE void gru_cell(int64_t n_units, int64_t ps, int64_t m, const T* __restrict pr,
                          const T* __restrict xr, const T* __restrict br,
                          const T* __restrict hp, T* __restrict hn, T* __restrict fr) {
  GRNN_IVDEP
  for (int64_t j = 0; j < n_units; ++j) {
    const T r = sigmoid_(pr[j] + xr[j] + br[j]);
    const T z = sigmoid_(pr[ps + j] + xr[m + j] + br[m + j]);
    const T hh = pr[2 * ps + j] + br[2 * m + j];
    const T n = tanh_(xr[2 * m + j] + r * hh);
    const T d = hp[j] - n;
    hn[j] = n + z * d;
    if constexpr (SAVE) {
      fr[j] = d * z * (T(1) - z);
      fr[m + j] = (T(1) - z) * (T(1) - n * n);
      fr[2 * m + j] = hh * r * (T(1) - r);
      fr[3 * m + j] = r;
      fr[4 * m + j] = z;
    }
  }
}

// The Elman RNN, h = tanh(p + x + b), on n units of one row.  F = 1 factor: 1 - h^2.
template <typename T, bool SAVE>
GRNN_INLINE void rnn_cell(int64_t n_units, const T* __restrict pr, const T* __restrict xr,
                          const T* __restrict br, T* __restrict hn, T* __restrict fr) {
  GRNN_IVDEP
  for (int64_t j = 0; j < n_units; ++j) {
    const T h = tanh_(pr[j] + xr[j] + br[j]);
    hn[j] = h;
    if constexpr (SAVE) fr[j] = T(1) - h * h;
  }
}

// Channel shuffle of one flat row: s[j*K + k] = u[k*m + j] (u: unit order, s: the
// order the next product reads); contiguous writes, the reads stay in L1.
template <typename T>
GRNN_INLINE void to_shuffled(const T* __restrict u, T* __restrict s, int64_t K, int64_t m) {
  for (int64_t j = 0; j < m; ++j)
    for (int64_t k = 0; k < K; ++k) s[j * K + k] = u[k * m + j];
}

// Batch rows [b0, b1) of one step of cell C: the K groups of a row, then its shuffled copy.
template <typename T, bool SAVE, int64_t C>
GRNN_INLINE void fwd_rows(const Fwd<T>& a, int64_t b0, int64_t b1) {
  const int64_t K = a.K, B = a.B, m = a.m, H = K * m;
  const int64_t G = gates_of(C) * m, F = factors_of(C) * m;
  for (int64_t b = b0; b < b1; ++b) {
    T* hn = a.h_new + b * H;
    if (a.keep && !a.keep[b]) {  // padded: the state stays, the output is zero
      std::copy(a.h_prev + b * H, a.h_prev + b * H + H, hn);
      if constexpr (C == kLSTM)
        for (int64_t k = 0; k < K; ++k)
          std::copy(a.c_prev + (k * B + b) * m, a.c_prev + (k * B + b) * m + m,
                    a.c_new + (k * B + b) * m);
      if (a.out) std::fill(a.out + b * H, a.out + b * H + H, T(0));
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const T* pr = a.pre + (k * B + b) * G;
        const T* xr = a.gx[k] + b * a.gx_sb;
        const T* br = a.bias + k * G;
        T* fr = SAVE ? a.fac + k * a.fac_sk + b * F : nullptr;
        if constexpr (C == kLSTM)
          lstm_cell<T, SAVE>(m, m, m, pr, xr, br, a.c_prev + (k * B + b) * m,
                                a.c_new + (k * B + b) * m, hn + k * m, fr);
        else if constexpr (C == kGRU)
          gru_cell<T, SAVE>(m, m, m, pr, xr, br, a.h_prev + b * H + k * m, hn + k * m, fr);
        else
          rnn_cell<T, SAVE>(m, pr, xr, br, hn + k * m, fr);
      }
      if (a.out) std::copy(hn, hn + H, a.out + b * H);
    }
    if (a.hs_new) to_shuffled(hn, a.hs_new + b * H, K, m);
  }
}

// ------------------------------------------------------------- fused forward (fp32)
// The step in one pass, for float: for each block of NU units of a group (the last one
// padded with zero weights where NU does not divide m), the recurrent product of the G
// gates (the block's G*NU columns of W_hh, packed so that the G*NU weights of one input are
// contiguous) is accumulated in registers for R batch rows at a time, and the cell runs on
// it at once: no product buffer and no second pass over it, and no per-call packing of the
// weights inside a BLAS call.  The operand is read through a column index (with the time
// shuffle, column q of the shuffled order is column (q % K) * m + q / K of the unit order),
// so the shuffled copy of h is written only when the backward needs it.
//
// The register tile follows the vector unit (Isa below): NU = one register's floats, and R
// rows such that the R x G accumulators, the G weight vectors and the broadcast operand fit
// in its registers (R <= 4).  AVX-512: 32 registers of 16 floats, R = 4.  AVX2 + FMA: 16 of
// 8, R = 2 for the LSTM (a tile of 16 floats x 4 rows, as AVX-512's, needs 40 ymm registers:
// the spills made the step about 10x slower than the two-pass step on an AVX2 machine).
// Anything else: NU = 4 (SSE2 / NEON), R as for AVX2; on x86 without AVX2 it took about 2x
// the two-pass step's time, so it runs only where GRNN_CPU_ISA=generic names it.
enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* ISA_NAMES[] = {"generic", "avx2", "avx512"};
constexpr int64_t lanes_of(int isa) { return isa == kAvx512 ? 16 : isa == kAvx2 ? 8 : 4; }
constexpr int regs_of(int isa) { return isa == kAvx512 ? 32 : 16; }
constexpr int rows_of(int isa, int64_t cell) {
  const int g = int(gates_of(cell)), r = (regs_of(isa) - g - 1) / g;
  return r < 1 ? 1 : r > 4 ? 4 : r;
}

template <int64_t NU>
struct Lanes {  // GCC vector types of NU floats: aligned (accumulators), unaligned (loads)
  typedef float v __attribute__((vector_size(NU * sizeof(float))));
  typedef float u __attribute__((vector_size(NU * sizeof(float)), aligned(4)));
};

struct Fused {             // one step
  Fwd<float> f;            // the step's pointers and shapes (f.pre unused)
  const float* wp;         // [K, blocks(m), m, G, NU] packed W_hh (pack_hh)
  const int32_t* col;      // [H] unit-order column of each operand column
};

// blocks of nu units in a group of m
inline int64_t blocks(int64_t m, int64_t nu) { return (m + nu - 1) / nu; }

constexpr int64_t PREFETCH_MIN_UNITS = 64;  // group width from which fused_block prefetches

// Rows [b0, b0 + R) of unit block u of group k, cell C, NU lanes.
template <int64_t C, int64_t NU, int R, bool SAVE>
GRNN_INLINE void fused_block(const Fused& fz, int64_t k, int64_t u, int64_t b0) {
  using vnu = typename Lanes<NU>::v;
  using vnu_u = typename Lanes<NU>::u;
  constexpr int NG = int(gates_of(C));
  const Fwd<float>& a = fz.f;
  const int64_t B = a.B, m = a.m, H = a.K * m, F = factors_of(C) * m;
  vnu acc[R][NG] = {};
  const int64_t n = std::min(NU, m - u * NU);  // units of the block (NU but in the last)
  const float* __restrict w = fz.wp + (k * blocks(m, NU) + u) * m * NG * NU;
  const int32_t* __restrict col = fz.col + k * m;
  const float* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = a.h_prev + (b0 + r) * H;
#ifndef GRNN_NO_PREFETCH
  // the next tile's input projections (read by its cell, after its product), one cache
  // line per row and gate: rows G*m floats apart, which the hardware does not foresee;
  // this tile's product gives them time to arrive, if it is long enough
  // (results/cpu_scan_prefetch_ab.txt: the K=4 forward of the layer 7-14% faster
  // on an Intel Xeon; at m = 16, 4-5% slower)
  for (int r = 0; m >= PREFETCH_MIN_UNITS && r < R && b0 + R + r < B; ++r) {
    const float* xr = a.gx[k] + (b0 + R + r) * a.gx_sb + u * NU;
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) __builtin_prefetch(xr + g * m, 0, 3);
  }
#endif
  for (int64_t j = 0; j < m; ++j) {
    const vnu_u* wj = reinterpret_cast<const vnu_u*>(w + j * NG * NU);
    vnu wg[NG];
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) wg[g] = wj[g];
    const int32_t q = col[j];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float x = rows[r][q];
#pragma GCC unroll 4
      for (int g = 0; g < NG; ++g) acc[r][g] += x * wg[g];
    }
  }
  // to memory with constant indices, so that acc stays in registers (a runtime index in
  // the loop below would keep it on the stack throughout)
  alignas(64) float pre[R][NG * NU];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) std::memcpy(pre[r] + g * NU, &acc[r][g], sizeof(vnu));
  for (int r = 0; r < R; ++r) {
    const int64_t b = b0 + r, hb = b * H + k * m + u * NU, cb = (k * B + b) * m + u * NU;
    if (a.keep && !a.keep[b]) {  // padded: the state stays, the output is zero
      std::copy(a.h_prev + hb, a.h_prev + hb + n, a.h_new + hb);
      if constexpr (C == kLSTM) std::copy(a.c_prev + cb, a.c_prev + cb + n, a.c_new + cb);
      if (a.out) std::fill(a.out + hb, a.out + hb + n, 0.0f);
      continue;
    }
    const float* xr = a.gx[k] + b * a.gx_sb + u * NU;
    const float* br = a.bias + k * NG * m + u * NU;
    float* fr = SAVE ? a.fac + k * a.fac_sk + b * F + u * NU : nullptr;
    if constexpr (C == kLSTM)
      lstm_cell<float, SAVE>(n, NU, m, pre[r], xr, br, a.c_prev + cb, a.c_new + cb,
                             a.h_new + hb, fr);
    else if constexpr (C == kGRU)
      gru_cell<float, SAVE>(n, NU, m, pre[r], xr, br, a.h_prev + hb, a.h_new + hb, fr);
    else
      rnn_cell<float, SAVE>(n, pre[r], xr, br, a.h_new + hb, fr);
    if (a.out) std::copy(a.h_new + hb, a.h_new + hb + n, a.out + hb);
  }
}

// The rows left after the tiles of R (fewer than R): one tile of that many.
template <int64_t C, int64_t NU, int R, bool SAVE>
GRNN_INLINE void fused_rest(const Fused& a, int64_t k, int64_t u, int64_t b, int64_t rest) {
  if constexpr (R > 0) {
    if (rest == R) fused_block<C, NU, R, SAVE>(a, k, u, b);
    else fused_rest<C, NU, R - 1, SAVE>(a, k, u, b, rest);
  }
}

// Tasks [s, e): task = k * blocks(m) + u, all B rows of unit block u of group k.
template <int64_t C, int ISA, bool SAVE>
GRNN_INLINE void fused_tasks(const Fused& a, int64_t s, int64_t e) {
  constexpr int64_t NU = lanes_of(ISA);
  constexpr int R = rows_of(ISA, C);
  const int64_t nb = blocks(a.f.m, NU), B = a.f.B;
  for (int64_t task = s; task < e; ++task) {
    const int64_t k = task / nb, u = task % nb;
    int64_t b = 0;
    for (; b + R <= B; b += R) fused_block<C, NU, R, SAVE>(a, k, u, b);
    fused_rest<C, NU, R - 1, SAVE>(a, k, u, b, B - b);
  }
}

template <int64_t C, int ISA>
GRNN_INLINE void fused_saving(const Fused& a, bool save, int64_t s, int64_t e) {
  if (save) fused_tasks<C, ISA, true>(a, s, e);
  else fused_tasks<C, ISA, false>(a, s, e);
}

template <int ISA>
GRNN_INLINE void fused_cells(const Fused& a, int64_t cell, bool save, int64_t s, int64_t e) {
  if (cell == kLSTM) fused_saving<kLSTM, ISA>(a, save, s, e);
  else if (cell == kGRU) fused_saving<kGRU, ISA>(a, save, s, e);
  else fused_saving<kRNN, ISA>(a, save, s, e);
}

// One entry point per vector unit, compiled for it (not target_clones: each needs its own
// tile, and the AVX2 one FMA, which GCC's "avx2" clone lacks); picked at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(GRNN_NO_CLONES)
#define GRNN_X86_ISAS 1
__attribute__((target("avx512f"))) void fused_avx512(const Fused& a, int64_t cell, bool save,
                                                     int64_t s, int64_t e) {
  fused_cells<kAvx512>(a, cell, save, s, e);
}
__attribute__((target("avx2,fma"))) void fused_avx2(const Fused& a, int64_t cell, bool save,
                                                    int64_t s, int64_t e) {
  fused_cells<kAvx2>(a, cell, save, s, e);
}
#endif
void fused_generic(const Fused& a, int64_t cell, bool save, int64_t s, int64_t e) {
  fused_cells<kGeneric>(a, cell, save, s, e);
}

// The widest vector unit this CPU has (among those compiled)
int detected_isa() {
  static const int isa = [] {
#ifdef GRNN_X86_ISAS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return int(kAvx512);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return int(kAvx2);
#endif
    return int(kGeneric);
  }();
  return isa;
}

// The fused step's vector unit: the detected one, or a narrower one named by GRNN_CPU_ISA
// (generic | avx2 | avx512; for A/B runs and tests); *named: whether the variable names it
int fused_isa(bool* named = nullptr) {
  const char* env = std::getenv("GRNN_CPU_ISA");
  if (named) *named = env && env[0];
  if (!env || !env[0]) return detected_isa();
  for (int isa = kGeneric; isa <= kAvx512; ++isa)
    if (std::strcmp(env, ISA_NAMES[isa]) == 0) {
      TORCH_CHECK(isa <= detected_isa(), "GRNN_CPU_ISA=", env, ": this CPU's widest vector ",
                  "unit is ", ISA_NAMES[detected_isa()], "; set generic, ",
                  ISA_NAMES[detected_isa()], " or a unit in between, or unset it");
      return isa;
    }
  TORCH_CHECK(false, "GRNN_CPU_ISA=", env, " is not one of generic, avx2, avx512 (the fused ",
              "CPU step's vector unit; unset: the widest this CPU has)");
  return kGeneric;
}

inline void run_fused(const Fused& a, int isa, int64_t cell, bool save, int64_t s, int64_t e) {
#ifdef GRNN_X86_ISAS
  if (isa == kAvx512) return fused_avx512(a, cell, save, s, e);
  if (isa == kAvx2) return fused_avx2(a, cell, save, s, e);
#endif
  fused_generic(a, cell, save, s, e);
}

// [K, Gm, m] -> [K, blocks(m), m, G, nu]: for unit block u and input j, the G gates' nu
// weights (zeros for the units past m of the last block)
Tensor pack_hh(const Tensor& w, int64_t K, int64_t G, int64_t m, int64_t nu) {
  const int64_t nb = blocks(m, nu);
  const Tensor units = at::constant_pad_nd(w.reshape({K, G, m, m}), {0, 0, 0, nb * nu - m});
  return units.view({K, G, nb, nu, m}).permute({0, 2, 4, 1, 3}).contiguous();
}

// operand column -> unit-order column (the time shuffle, or the identity)
Tensor operand_columns(int64_t K, int64_t m, bool shuffle) {
  Tensor col = at::empty({K * m}, at::TensorOptions().dtype(at::kInt));
  int32_t* p = col.data_ptr<int32_t>();
  for (int64_t q = 0; q < K * m; ++q) p[q] = int32_t(shuffle ? (q % K) * m + q / K : q);
  return col;
}

// The fused step is used for float over at least FUSED_MIN_STEPS steps (packing W_hh costs
// about one step's product: single decoding steps keep the BLAS product) where the padding
// of the last unit block adds at most 1/8 to the product (with 16 lanes m = 16, 32, ...,
// 100, 250, ...), with AVX2 or AVX-512 (the generic unit only where GRNN_CPU_ISA names it),
// unless GRNN_CPU_FUSED=0 (the two-pass step: one batched BLAS product, then the pointwise
// pass; for A/B measurements and tests).
constexpr int64_t FUSED_MIN_STEPS = 4;
std::atomic<int64_t> fused_calls{0};  // forward calls that took the fused step (for tests)
// the switches of both register tiles (this step and the backward product): float, a
// unit with a tile (generic only where named), GRNN_CPU_FUSED not 0
inline bool tiles_on(c10::ScalarType dtype, int isa, bool named) {
  const char* env = std::getenv("GRNN_CPU_FUSED");
  return dtype == at::kFloat && (isa != kGeneric || named) && !(env && env[0] == '0');
}
inline bool use_fused(c10::ScalarType dtype, int64_t m, int64_t steps, int isa, bool named) {
  const int64_t nu = lanes_of(isa);
  return tiles_on(dtype, isa, named) && blocks(m, nu) * nu * 8 <= m * 9 &&
         steps >= FUSED_MIN_STEPS;
}

// ------------------------------------------------------------ backward product (fp32)
// The backward's recurrent product of one step, mg[k] = dG_t[k] W_hh[k] ([B, G*m] x
// [G*m, m] per group), in registers: for each block of NV vectors of NU units (NV <= 4) and
// R batch rows, the sum over all G*m inputs accumulates in R x NV registers, from W_hh's
// rows as they are (row j holds the m units' weights, contiguous: nothing to pack) and
// the gate gradient broadcast.  The fused forward's tile (R = rows_of(ISA, 4 "gates")).
// It replaces one BLAS call per step, which MKL ran at 160-180 GFLOP/s on an AMD Zen 5
// (AVX2 code on AMD CPUs); used where the unit's lanes divide m (else BLAS), on the fused
// forward's switches (GRNN_CPU_FUSED, GRNN_CPU_ISA).
struct BwdProduct {
  const float* dg;  // step t's gate gradients: row (k, b) at dg + k * dg_sk + b * Gm
  int64_t dg_sk;
  const float* w;   // [K, Gm, m] contiguous
  float* mg;        // [K, B, m] contiguous
  int64_t K, B, Gm, m;
};
constexpr int BWD_NV = 4;

// Rows [b0, b0 + R) of the NV * NU units from u0 of group k, inputs [j0, j1): the sum
// starts from zero at j0 = 0, else from what mg holds.
template <int64_t NU, int NV, int R>
GRNN_INLINE void bwd_product_block(const BwdProduct& p, int64_t k, int64_t u0, int64_t b0,
                                   int64_t j0, int64_t j1) {
  using vnu = typename Lanes<NU>::v;
  using vnu_u = typename Lanes<NU>::u;
  vnu acc[R][NV] = {};
  if (j0 > 0) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* out = p.mg + (k * p.B + b0 + r) * p.m + u0;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) std::memcpy(&acc[r][v], out + v * NU, sizeof(vnu));
    }
  }
  const float* __restrict w = p.w + k * p.Gm * p.m + u0;
  const float* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = p.dg + k * p.dg_sk + (b0 + r) * p.Gm;
  for (int64_t j = j0; j < j1; ++j) {
    const vnu_u* wj = reinterpret_cast<const vnu_u*>(w + j * p.m);
    vnu wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = wj[v];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float x = rows[r][j];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += x * wv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* out = p.mg + (k * p.B + b0 + r) * p.m + u0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(out + v * NU, &acc[r][v], sizeof(vnu));
  }
}

template <int64_t NU, int NV, int R>
GRNN_INLINE void bwd_product_rest(const BwdProduct& p, int64_t k, int64_t u0, int64_t b,
                                  int64_t rest, int64_t j0, int64_t j1) {
  if constexpr (R > 0) {
    if (rest == R) bwd_product_block<NU, NV, R>(p, k, u0, b, j0, j1);
    else bwd_product_rest<NU, NV, R - 1>(p, k, u0, b, rest, j0, j1);
  }
}

// All B rows, over the inputs in chunks whose W_hh panel (chunk x NV * NU floats, about
// 32 KiB) stays in cache for every tile of rows: without the chunks a wide group (m = 1024:
// a 1 MiB panel per block of 64 units) was read from memory once per tile of R rows, and
// the product took twice MKL's time.
template <int64_t NU, int NV, int R>
GRNN_INLINE void bwd_product_rows(const BwdProduct& p, int64_t k, int64_t u0) {
  constexpr int64_t chunk = 8192 / (NV * NU);
  for (int64_t j0 = 0; j0 < p.Gm; j0 += chunk) {
    const int64_t j1 = std::min(p.Gm, j0 + chunk);
    int64_t b = 0;
    for (; b + R <= p.B; b += R) bwd_product_block<NU, NV, R>(p, k, u0, b, j0, j1);
    bwd_product_rest<NU, NV, R - 1>(p, k, u0, b, p.B - b, j0, j1);
  }
}

// blocks of BWD_NV vectors of nu units in a group of m (nu divides m)
inline int64_t product_blocks(int64_t m, int64_t nu) { return blocks(m / nu, BWD_NV); }

// Tasks [s, e): task = k * product_blocks + c, all B rows of unit block c of group k.
template <int ISA>
GRNN_INLINE void bwd_product_tasks(const BwdProduct& p, int64_t s, int64_t e) {
  constexpr int64_t NU = lanes_of(ISA);
  constexpr int R = rows_of(ISA, kLSTM);
  const int64_t nv = p.m / NU, nb = product_blocks(p.m, NU);
  for (int64_t task = s; task < e; ++task) {
    const int64_t k = task / nb, c = task % nb, u0 = c * BWD_NV * NU;
    switch (std::min<int64_t>(BWD_NV, nv - c * BWD_NV)) {
      case 4: bwd_product_rows<NU, 4, R>(p, k, u0); break;
      case 3: bwd_product_rows<NU, 3, R>(p, k, u0); break;
      case 2: bwd_product_rows<NU, 2, R>(p, k, u0); break;
      default: bwd_product_rows<NU, 1, R>(p, k, u0);
    }
  }
}

#ifdef GRNN_X86_ISAS
__attribute__((target("avx512f"))) void bwd_product_avx512(const BwdProduct& p, int64_t s,
                                                           int64_t e) {
  bwd_product_tasks<kAvx512>(p, s, e);
}
__attribute__((target("avx2,fma"))) void bwd_product_avx2(const BwdProduct& p, int64_t s,
                                                          int64_t e) {
  bwd_product_tasks<kAvx2>(p, s, e);
}
#endif
void bwd_product_generic(const BwdProduct& p, int64_t s, int64_t e) {
  bwd_product_tasks<kGeneric>(p, s, e);
}

std::atomic<int64_t> fused_backward_calls{0};  // backward calls with this product (tests)
// where the fused forward step's switches allow it and the unit's lanes divide m
inline bool use_fused_product(c10::ScalarType dtype, int64_t m, int isa, bool named) {
  return tiles_on(dtype, isa, named) && m % lanes_of(isa) == 0;
}

inline void run_bwd_product(const BwdProduct& p, int isa, int64_t s, int64_t e) {
#ifdef GRNN_X86_ISAS
  if (isa == kAvx512) return bwd_product_avx512(p, s, e);
  if (isa == kAvx2) return bwd_product_avx2(p, s, e);
#endif
  bwd_product_generic(p, s, e);
}

// mg = dg_t W_hh per group (dg_t: [K, B, Gm] with rows of Gm contiguous), on vector unit isa
inline void fused_product(Tensor& mg, const Tensor& dg_t, const Tensor& w, int isa) {
  const int64_t K = w.size(0), Gm = w.size(1), m = w.size(2), B = mg.size(1);
  const BwdProduct p{dg_t.data_ptr<float>(), dg_t.stride(0), w.data_ptr<float>(),
                     mg.data_ptr<float>(), K, B, Gm, m};
  const int64_t nu = lanes_of(isa), tasks = K * product_blocks(m, nu);
  // unit blocks per thread: at least ~2^18 multiply-adds, so that small problems stay serial
  const int64_t grain_tasks = std::max<int64_t>(1, (int64_t(1) << 18) / (B * Gm * BWD_NV * nu));
  at::parallel_for(0, tasks, grain_tasks,
                   [&](int64_t s, int64_t e) { run_bwd_product(p, isa, s, e); });
}

// ------------------------------------------------------- the gate gradients transposed
// A backward asked for them ("transposed") writes step t's gate gradients, rows [B, Gm]
// with a row stride of Gm, also into columns t*B .. t*B+B-1 of dG^T [Gm, N] (N = T*B),
// while they are in cache.  Tiles of NU x NU floats are transposed in registers: log2(NU)
// rounds of two-source shuffles, each swapping the off-diagonal blocks of every 2bs x 2bs
// block (bs = NU/2, ..., 1); the edges element by element.  Element by element throughout
// (the first version) it took 3.5 ms of a 15 ms backward of the 4-group layer.
template <int64_t NU>
struct Ints {
  typedef int32_t v __attribute__((vector_size(NU * sizeof(int32_t))));
};

// lane p of round bs's shuffle of rows (a, b): the low result takes the even blocks of
// a and b in turn, the high one the odd blocks (index NU + i: lane i of b)
constexpr int32_t swap_lane(int64_t nu, int64_t bs, bool high, int64_t p) {
  const int64_t c = p / (2 * bs) * 2 * bs, q = p % (2 * bs);
  return int32_t(high ? (q < bs ? c + bs + q : nu + c + q) : (q < bs ? c + q : nu + c + q - bs));
}

// one shuffle of round bs with constant lanes: __builtin_shufflevector (clang, GCC >= 12),
// or GCC's older __builtin_shuffle with a constant mask
template <int64_t NU, int64_t BS, bool HIGH, size_t... P>
GRNN_INLINE typename Lanes<NU>::v swap_pick(typename Lanes<NU>::v a, typename Lanes<NU>::v b,
                                            std::index_sequence<P...>) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  return __builtin_shufflevector(a, b, swap_lane(NU, BS, HIGH, int64_t(P))...);
#else
  return __builtin_shuffle(a, b, typename Ints<NU>::v{swap_lane(NU, BS, HIGH, int64_t(P))...});
#endif
}

template <int64_t NU, int64_t BS>
GRNN_INLINE void swap_round(typename Lanes<NU>::v* r) {
#pragma GCC unroll 16
  for (int64_t i = 0; i < NU; ++i) {
    if (i & BS) continue;
    const auto a = r[i], b = r[i + BS];
    r[i] = swap_pick<NU, BS, false>(a, b, std::make_index_sequence<NU>{});
    r[i + BS] = swap_pick<NU, BS, true>(a, b, std::make_index_sequence<NU>{});
  }
  if constexpr (BS > 1) swap_round<NU, BS / 2>(r);
}

// rows [B, G] of src -> dst [G, N] (row stride N) for the gate rows [j0, j1)
template <int64_t NU>
GRNN_INLINE void transpose_rows(const float* __restrict src, int64_t B, int64_t G,
                                float* __restrict dst, int64_t N, int64_t j0, int64_t j1) {
  using vu = typename Lanes<NU>::u;
  const int64_t bt = B / NU * NU;
  int64_t j = j0;
  for (; j + NU <= j1; j += NU) {
    for (int64_t b = 0; b < bt; b += NU) {
      typename Lanes<NU>::v r[NU];
#pragma GCC unroll 16
      for (int64_t i = 0; i < NU; ++i) r[i] = *reinterpret_cast<const vu*>(src + (b + i) * G + j);
      if constexpr (NU > 1) swap_round<NU, NU / 2>(r);
#pragma GCC unroll 16
      for (int64_t i = 0; i < NU; ++i) *reinterpret_cast<vu*>(dst + (j + i) * N + b) = r[i];
    }
    for (int64_t i = 0; i < NU; ++i)
      for (int64_t b = bt; b < B; ++b) dst[(j + i) * N + b] = src[b * G + j + i];
  }
  for (; j < j1; ++j)
    for (int64_t b = 0; b < B; ++b) dst[j * N + b] = src[b * G + j];
}

#ifdef GRNN_X86_ISAS
__attribute__((target("avx512f"))) void transpose_avx512(const float* src, int64_t B, int64_t G,
                                                         float* dst, int64_t N, int64_t j0,
                                                         int64_t j1) {
  transpose_rows<16>(src, B, G, dst, N, j0, j1);
}
__attribute__((target("avx2"))) void transpose_avx2(const float* src, int64_t B, int64_t G,
                                                    float* dst, int64_t N, int64_t j0,
                                                    int64_t j1) {
  transpose_rows<8>(src, B, G, dst, N, j0, j1);
}
#endif

inline void transpose_step(const float* src, int64_t B, int64_t G, float* dst, int64_t N,
                           int64_t j0, int64_t j1, int isa) {
#ifdef GRNN_X86_ISAS
  if (isa == kAvx512) return transpose_avx512(src, B, G, dst, N, j0, j1);
  if (isa == kAvx2) return transpose_avx2(src, B, G, dst, N, j0, j1);
#endif
  transpose_rows<4>(src, B, G, dst, N, j0, j1);
}
inline void transpose_step(const double* src, int64_t B, int64_t G, double* dst, int64_t N,
                           int64_t j0, int64_t j1, int) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t b = 0; b < B; ++b) dst[j * N + b] = src[b * G + j];
}

// ---------------------------------------------------------------------------- backward
template <typename T>
struct Bwd {               // one step
  const T* mg;             // [K, B, m] gradient of the later step's product operand
  bool shuffle;            // mg is in shuffled order
  T* scratch;              // [threads, H] a row of mg in unit order (shuffle)
  const T* dout;           // [B, H] gradient of the step's output, or null
  const T* fac;            // fac[:, t] as in Fwd, or null: only ph += mg (gradient of h0)
  int64_t fac_sk;
  T* dg;                   // dg[:, t]: row (k, b) at k * dg_sk + b * Gm (recurrent side)
  T* dx;                   // the same for the input side where it differs (GRU), or null
  int64_t dg_sk;
  double* dbias;           // [threads, K, Gm] partial sums of dg (the bias gradient)
  int64_t threads;
  T* ph;                   // [K, B, m] gradient of h not yet taken by a cell
  T* gc;                   // [K, B, m] gradient of c (LSTM)
  const bool* keep;
  int64_t K, B, m;
};

// Row b of the shuffled-order operand gradient (held per group in mg [K, B, m]) in unit
// order: u[k*m + j] = operand column q = j*K + k, read in order (q = kk*m + jj).
template <typename T>
GRNN_INLINE void from_shuffled(const T* mg, int64_t B, int64_t b, T* __restrict u, int64_t K,
                               int64_t m) {
  int64_t j = 0, k = 0;
  for (int64_t kk = 0; kk < K; ++kk) {
    const T* __restrict src = mg + (kk * B + b) * m;
    for (int64_t jj = 0; jj < m; ++jj) {
      u[k * m + j] = src[jj];
      if (++k == K) {
        k = 0;
        ++j;
      }
    }
  }
}

// The backward of the LSTM on one row: ph holds dh (the total gradient of h_t, consumed:
// reset to 0), gc the gradient of c_t (replaced by that of c_{t-1}); dg: the gates.
template <typename T>
GRNN_INLINE void lstm_cell_backward(int64_t m, const T* __restrict fr, T* __restrict ph,
                               T* __restrict gc, T* __restrict dg) {
  GRNN_IVDEP
  for (int64_t j = 0; j < m; ++j) {
    const T dh = ph[j];
    const T dc = gc[j] + dh * fr[4 * m + j];
    dg[j] = dc * fr[j];
    dg[m + j] = dc * fr[m + j];
    dg[2 * m + j] = dc * fr[2 * m + j];
    dg[3 * m + j] = dh * fr[3 * m + j];
    gc[j] = dc * fr[5 * m + j];
    ph[j] = T(0);
  }
}

// The GRU's backward on one row: ph holds dh (replaced by z dh, the gradient that goes to
// the unit's own h_{t-1}); pre-activation gradients dn' = dh (1-z)(1-n^2),
// dz' = dh (h_{t-1} - n) z(1-z), dr' = dn' (p_n + b_n) r(1-r); dg (recurrent side: the
// next product, dW_hh, db_hh) = (dr', dz', r dn'), dx (input side) = (dr', dz', dn').
template <typename T>
GRNN_INLINE void gru_cell_backward(int64_t m, const T* __restrict fr, T* __restrict ph,
                              T* __restrict dg, T* __restrict dx) {
  GRNN_IVDEP
  for (int64_t j = 0; j < m; ++j) {
    const T dh = ph[j];
    const T dn = dh * fr[m + j];
    const T dz = dh * fr[j];
    const T dr = dn * fr[2 * m + j];
    dg[j] = dr;
    dg[m + j] = dz;
    dg[2 * m + j] = dn * fr[3 * m + j];
    dx[j] = dr;
    dx[m + j] = dz;
    dx[2 * m + j] = dn;
    ph[j] = dh * fr[4 * m + j];
  }
}

// The Elman RNN's backward on one row: dg = dh (1 - h^2); h_{t-1} gets nothing directly.
template <typename T>
GRNN_INLINE void rnn_cell_backward(int64_t m, const T* __restrict fr, T* __restrict ph,
                              T* __restrict dg) {
  GRNN_IVDEP
  for (int64_t j = 0; j < m; ++j) {
    dg[j] = ph[j] * fr[j];
    ph[j] = T(0);
  }
}

template <typename T>
GRNN_INLINE void add_row(T* __restrict y, const T* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += x[j];
}

template <typename T>
GRNN_INLINE void sum_row(double* __restrict y, const T* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += double(x[j]);
}

// Batch rows [b0, b1) of one step of the backward of cell C.
template <typename T, int64_t C>
GRNN_INLINE void bwd_rows(const Bwd<T>& a, int64_t b0, int64_t b1) {
  const int64_t K = a.K, B = a.B, m = a.m, H = K * m;
  const int64_t G = gates_of(C) * m, F = factors_of(C) * m;
  const int64_t tid = at::get_thread_num();
  TORCH_CHECK(tid < a.threads, "grnn rnn_cpu: thread ", tid, " of ", a.threads);
  T* u = a.shuffle ? a.scratch + tid * H : nullptr;
  double* dbias = a.fac ? a.dbias + tid * K * G : nullptr;
  for (int64_t b = b0; b < b1; ++b) {
    if (u) from_shuffled(a.mg, B, b, u, K, m);
    const bool keep = !a.keep || a.keep[b];
    for (int64_t k = 0; k < K; ++k) {
      T* ph = a.ph + (k * B + b) * m;
      add_row(ph, u ? u + k * m : a.mg + (k * B + b) * m, m);
      if (!a.fac) continue;  // the final pass: d_h0 = ph
      T* dg = a.dg + k * a.dg_sk + b * G;
      T* dx = C == kGRU ? a.dx + k * a.dg_sk + b * G : nullptr;
      if (!keep) {  // padded: dh passes on to h_{t-1} (LSTM: dc to c_{t-1})
        std::fill(dg, dg + G, T(0));
        if (dx) std::fill(dx, dx + G, T(0));
        continue;
      }
      if (a.dout) add_row(ph, a.dout + b * H + k * m, m);
      const T* fr = a.fac + k * a.fac_sk + b * F;
      if constexpr (C == kLSTM)
        lstm_cell_backward(m, fr, ph, a.gc + (k * B + b) * m, dg);
      else if constexpr (C == kGRU)
        gru_cell_backward(m, fr, ph, dg, dx);
      else
        rnn_cell_backward(m, fr, ph, dg);
      sum_row(dbias + k * G, dg, G);
    }
  }
}

// One entry point per type, cell and variant, each cloned for the vector widths (GCC does
// not multiversion templates: plain functions, written by these macros).
#define GRNN_ROWS(T, t, C, c)                                                               \
  GRNN_CLONES void fwd_##c##_##t##_save(const Fwd<T>& a, int64_t s, int64_t e) {            \
    fwd_rows<T, true, C>(a, s, e);                                                          \
  }                                                                                         \
  GRNN_CLONES void fwd_##c##_##t(const Fwd<T>& a, int64_t s, int64_t e) {                   \
    fwd_rows<T, false, C>(a, s, e);                                                         \
  }                                                                                         \
  GRNN_CLONES void bwd_##c##_##t(const Bwd<T>& a, int64_t s, int64_t e) { bwd_rows<T, C>(a, s, e); }
GRNN_ROWS(float, f, kLSTM, lstm)
GRNN_ROWS(double, d, kLSTM, lstm)
GRNN_ROWS(float, f, kGRU, gru)
GRNN_ROWS(double, d, kGRU, gru)
GRNN_ROWS(float, f, kRNN, rnn)
GRNN_ROWS(double, d, kRNN, rnn)
#undef GRNN_ROWS

#define GRNN_DISPATCH(T, t)                                                                 \
  inline void run_rows(const Fwd<T>& a, int64_t cell, bool save, int64_t s, int64_t e) {    \
    if (cell == kLSTM) save ? fwd_lstm_##t##_save(a, s, e) : fwd_lstm_##t(a, s, e);         \
    else if (cell == kGRU) save ? fwd_gru_##t##_save(a, s, e) : fwd_gru_##t(a, s, e);       \
    else save ? fwd_rnn_##t##_save(a, s, e) : fwd_rnn_##t(a, s, e);                         \
  }                                                                                         \
  inline void run_rows(const Bwd<T>& a, int64_t cell, int64_t s, int64_t e) {               \
    if (cell == kLSTM) bwd_lstm_##t(a, s, e);                                               \
    else if (cell == kGRU) bwd_gru_##t(a, s, e);                                            \
    else bwd_rnn_##t(a, s, e);                                                              \
  }
GRNN_DISPATCH(float, f)
GRNN_DISPATCH(double, d)
#undef GRNN_DISPATCH
// batch rows per parallel task: at least ~4k units, so that small problems stay serial
inline int64_t grain(int64_t h) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(h, 1)); }

struct FusedPlan {         // the fused step's vector unit, cell, packed W_hh and operand
  int isa;                 // index, or nulls
  int64_t cell;
  const float* wp;
  const int32_t* col;
};

// One step through the fused path; false (nothing done) when it does not apply.
inline bool fused_step(const Fwd<double>&, const FusedPlan&, bool) { return false; }
inline bool fused_step(const Fwd<float>& a, const FusedPlan& plan, bool save) {
  if (!plan.wp) return false;
  const Fused fz{a, plan.wp, plan.col};
  const int64_t nu = lanes_of(plan.isa);
  const int64_t K = a.K, B = a.B, m = a.m, H = K * m, tasks = K * blocks(m, nu);
  // unit blocks per thread: at least ~2^18 multiply-adds, so that small problems stay serial
  const int64_t grain_tasks =
      std::max<int64_t>(1, (int64_t(1) << 18) / (B * m * gates_of(plan.cell) * nu));
  at::parallel_for(0, tasks, grain_tasks, [&](int64_t s, int64_t e) {
    run_fused(fz, plan.isa, plan.cell, save, s, e);
  });
  if (save && a.hs_new)  // the shuffled operands, for the backward's dW_hh
    at::parallel_for(0, B, grain(H), [&](int64_t s, int64_t e) {
      for (int64_t b = s; b < e; ++b) to_shuffled(a.h_new + b * H, a.hs_new + b * H, K, m);
    });
  return true;
}

// out = a @ b over the K groups (dim 0).  With several threads and K a multiple of their
// number, each thread takes whole groups (BLAS runs single-threaded inside the parallel
// region): one parallel region, no split of a small product; otherwise BLAS threads it.
inline void grouped_mm(Tensor& out, const Tensor& a, const Tensor& b) {
  const int64_t K = a.size(0), threads = at::get_num_threads();
  if (threads <= 1 || K % threads != 0 || at::in_parallel_region()) {
    at::bmm_out(out, a, b);
    return;
  }
  at::parallel_for(0, K, K / threads, [&](int64_t k0, int64_t k1) {
    at::NoGradGuard no_grad;  // worker threads do not inherit the caller's grad mode
    Tensor o = out.narrow(0, k0, k1 - k0);
    at::bmm_out(o, a.narrow(0, k0, k1 - k0), b.narrow(0, k0, k1 - k0));
  });
}

// [B, H] -> [K, B, m] view
inline Tensor grouped(const Tensor& flat, int64_t k) {
  return flat.view({flat.size(0), k, flat.size(1) / k}).transpose(0, 1);
}

// ------------------------------------------------------------------------ buffer pool
// The large per-call buffers (state slots, saved factors, gate gradients: tens of MB) come
// from a small pool: a freed buffer is kept for a later call rather than returned to the
// OS, which would fault in fresh zeroed pages on the next call (measured: as much time as
// the whole forward pass at K=16).  Blocks of 1 MiB and more; at most $GRNN_CPU_POOL_MB
// (default 1024) MiB kept while free.
class Pool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    Block* blk = new Block(take(n));
    return {blk->ptr, blk, &Pool::release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
  static Pool& get() {  // never destroyed: tensors may outlive the library's statics
    static Pool* pool = new Pool();
    return *pool;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };
  std::mutex mu_;
  std::deque<Block> free_;  // oldest first
  size_t free_bytes_ = 0;
  size_t cap_;

  Pool() {
    const char* mb = std::getenv("GRNN_CPU_POOL_MB");
    cap_ = size_t(mb ? std::max(0L, std::atol(mb)) : 1024) << 20;
  }

  Block take(size_t n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)  // smallest fit, <= 2x
        if (it->size >= n && it->size <= 2 * n && (best == free_.end() || it->size < best->size))
          best = it;
      if (best != free_.end()) {
        const Block blk = *best;
        free_bytes_ -= blk.size;
        free_.erase(best);
        return blk;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, 64, std::max<size_t>(n, 64)) != 0 || p == nullptr)
      TORCH_CHECK(false, "grnn rnn_cpu: out of memory allocating ", n, " bytes");
    return {p, n};
  }

  static void release(void* ctx) {
    Block* blk = static_cast<Block*>(ctx);
    get().give(*blk);
    delete blk;
  }

  void give(Block blk) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (blk.size > cap_) {
        drop.push_back(blk.ptr);
      } else {
        free_.push_back(blk);
        free_bytes_ += blk.size;
        while (free_bytes_ > cap_) {
          drop.push_back(free_.front().ptr);
          free_bytes_ -= free_.front().size;
          free_.pop_front();
        }
      }
    }
    for (void* p : drop) std::free(p);
  }
};

// at::empty, through the pool for buffers of 1 MiB and more
Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  int64_t n = c10::elementSize(opt.dtype().toScalarType());
  for (int64_t s : sizes) n *= s;
  if (n < (int64_t(1) << 20)) return at::empty(sizes, opt);
  return at::detail::empty_generic(sizes, &Pool::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   opt.dtype().toScalarType(), std::nullopt);
}

// ----------------------------------------------------------------------------- drivers
inline int64_t check_cell(int64_t cell) {
  TORCH_CHECK(cell == kLSTM || cell == kGRU || cell == kRNN, "grnn rnn_cpu: cell ", cell,
              " is not 0 (LSTM), 1 (GRU) or 2 (RNN)");
  return cell;
}

// gx as one tensor [T, K, B, Gm] or as the K groups' [T, B, Gm] -> the groups' [T, B, Gm]
// (views where they can be) with unit stride along the gates and one stride over t and b
std::vector<Tensor> groups_of_gx(at::TensorList gx) {
  std::vector<Tensor> parts;
  if (gx.size() == 1 && gx[0].dim() == 4) {
    parts = (gx[0].stride(3) == 1 ? gx[0] : gx[0].contiguous()).unbind(1);
  } else {
    for (const Tensor& g : gx) {
      TORCH_CHECK(g.dim() == 3 && g.sizes() == gx[0].sizes(),
                  "gx must be [T, K, B, Gm] or K tensors [T, B, Gm] of one shape");
      parts.push_back(g);
    }
  }
  TORCH_CHECK(!parts.empty(), "gx must be [T, K, B, Gm] or K tensors [T, B, Gm]");
  bool alike = true;
  for (const Tensor& p : parts) {
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == parts[0].scalar_type(),
                "gx's groups must be CPU tensors of one dtype");
    alike = alike && p.stride(2) == 1 && p.stride(0) == parts[0].stride(0) &&
            p.stride(1) == parts[0].stride(1);
  }
  if (!alike)
    for (Tensor& p : parts) p = p.contiguous();
  return parts;
}

// -> (out [T, B, H], h_T [K, B, m], c_T [K, B, m] (LSTM; else empty), fac, hs); fac and hs
// are empty tensors unless ``save``.  ``out`` is a view of hs when there is neither mask
// nor shuffle.  c0: the LSTM's initial cell state (ignored for the other cells).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> scan_forward(
    at::TensorList gx_in, const Tensor& h0, const std::optional<Tensor>& c0,
    const Tensor& weight_hh, const Tensor& bias_hh, const std::optional<Tensor>& mask_in,
    bool shuffle, bool reverse, bool save, int64_t cell) {
  at::NoGradGuard no_grad;
  const bool lstm = check_cell(cell) == kLSTM;
  const int64_t gates = gates_of(cell);
  const std::vector<Tensor> parts = groups_of_gx(gx_in);
  const Tensor& gx = parts[0];
  TORCH_CHECK(gx.size(2) % gates == 0, "gx's last size must be gates * m");
  const int64_t T = gx.size(0), K = static_cast<int64_t>(parts.size()), B = gx.size(1);
  const int64_t m = gx.size(2) / gates, H = K * m, G = gates * m;
  TORCH_CHECK(T > 0 && B > 0 && m > 0, "empty input");
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == K && h0.size(1) == B && h0.size(2) == m,
              "h0 must be [K, B, m]");
  TORCH_CHECK(!lstm || (c0.has_value() && c0->sizes() == h0.sizes()), "c0 must be [K, B, m]");
  TORCH_CHECK(weight_hh.dim() == 3 && weight_hh.size(0) == K && weight_hh.size(1) == G &&
              weight_hh.size(2) == m, "weight_hh must be [K, Gm, m]");
  TORCH_CHECK(bias_hh.numel() == K * G, "bias_hh must be [K, Gm]");
  for (const Tensor* x : {&h0, &weight_hh, &bias_hh, lstm ? &*c0 : &h0})
    TORCH_CHECK(x->scalar_type() == gx.scalar_type() && x->device().is_cpu(),
                "all tensors must be CPU tensors of gx's dtype");
  const Tensor w_t = weight_hh.transpose(1, 2);  // [K, m, Gm]
  const Tensor bias = bias_hh.contiguous();
  Tensor keep;
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK(mask_in->dim() == 2 && mask_in->size(0) == T && mask_in->size(1) == B,
                "mask must be [T, B]");
    keep = mask_in->to(at::kBool).contiguous();
  }
  const auto opt = gx.options();
  const int64_t slots = T + 2;
  Tensor hu = empty_buffer({slots, B, H}, opt);
  const int64_t hs_slots = save ? slots : 2;   // inference: two alternating slots suffice
  Tensor hs = shuffle ? empty_buffer({hs_slots, B, H}, opt) : hu;
  Tensor cs = lstm ? empty_buffer({2, K, B, m}, opt) : Tensor();
  bool named = false;
  const int isa = fused_isa(&named);
  const int64_t nu = lanes_of(isa);
  const bool fused = use_fused(gx.scalar_type(), m, T, isa, named);
  if (fused) ++fused_calls;
  Tensor pre = fused ? Tensor() : empty_buffer({K, B, G}, opt);
  const int64_t F = factors_of(cell) * m;
  Tensor fac = save ? empty_buffer({K, T, B, F}, opt) : at::empty({0}, opt);
  Tensor out = keep.defined() ? empty_buffer({T, B, H}, opt) : hu.narrow(0, 1, T);
  const int64_t first = reverse ? T + 1 : 0, last = reverse ? 1 : T;
  auto hs_slot = [&](int64_t s) { return shuffle ? hs[s % hs_slots] : hu[s]; };
  grouped(hu[first], K).copy_(h0);
  if (shuffle) hs_slot(first).view({B, m, K}).copy_(hu[first].view({B, K, m}).transpose(1, 2));
  if (lstm) cs[first % 2].copy_(*c0);

  const Tensor wp = fused ? pack_hh(weight_hh, K, gates, m, nu) : Tensor();
  const Tensor col = fused ? operand_columns(K, m, shuffle) : Tensor();
  const FusedPlan plan{isa, cell, fused ? wp.data_ptr<float>() : nullptr,
                       fused ? col.data_ptr<int32_t>() : nullptr};

  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "grnn_rnn_forward", [&] {
    using T_ = scalar_t;
    Fwd<T_> a{};
    std::vector<const T_*> gx_0(K), gx_t(K);  // the groups' rows of step 0 and of step t
    for (int64_t k = 0; k < K; ++k) gx_0[k] = parts[k].data_ptr<T_>();
    a.gx = gx_t.data();
    a.gx_sb = gx.stride(1);
    a.bias = bias.data_ptr<T_>();
    a.pre = fused ? nullptr : pre.data_ptr<T_>();
    a.fac_sk = T * B * F;
    a.K = K;
    a.B = B;
    a.m = m;
    T_* hu_p = hu.data_ptr<T_>();
    T_* hs_p = shuffle ? hs.data_ptr<T_>() : nullptr;
    T_* cs_p = lstm ? cs.data_ptr<T_>() : nullptr;
    T_* out_p = keep.defined() ? out.data_ptr<T_>() : nullptr;
    for (int64_t n = 0; n < T; ++n) {
      const int64_t t = reverse ? T - 1 - n : n;
      const int64_t s_in = reverse ? t + 2 : t, s_out = t + 1;
      for (int64_t k = 0; k < K; ++k) gx_t[k] = gx_0[k] + t * gx.stride(0);
      a.c_prev = lstm ? cs_p + (s_in % 2) * K * B * m : nullptr;
      a.c_new = lstm ? cs_p + (s_out % 2) * K * B * m : nullptr;
      a.h_prev = hu_p + s_in * B * H;
      a.h_new = hu_p + s_out * B * H;
      a.hs_new = shuffle ? hs_p + (s_out % hs_slots) * B * H : nullptr;
      a.out = out_p ? out_p + t * B * H : nullptr;
      a.fac = save ? fac.data_ptr<T_>() + t * B * F : nullptr;
      a.keep = keep.defined() ? keep.data_ptr<bool>() + t * B : nullptr;
      if (fused_step(a, plan, save)) continue;
      grouped_mm(pre, grouped(hs_slot(s_in), K), w_t);
      at::parallel_for(0, B, grain(H), [&](int64_t s, int64_t e) {
        run_rows(a, cell, save, s, e);
      });
    }
  });
  Tensor h_t = empty_buffer({K, B, m}, opt).copy_(grouped(hu[last], K));
  Tensor c_t = lstm ? empty_buffer({K, B, m}, opt).copy_(cs[last % 2]) : at::empty({0}, opt);
  return {out, h_t, c_t, fac, save ? hs : at::empty({0}, opt)};
}

// -> (d_gx [T, K, B, Gm] (a transposed view of [K, T, B, Gm]), d_h0, d_c0 (LSTM; else
// empty), d_weight_hh, d_bias_hh).  d_out [T, B, H], d_h / d_c [K, B, m]: each optional.
// weight_grad false (a caller that computes the weight gradients itself): d_weight_hh's
// slot holds the hidden-side gate gradients instead (the GRU's differ from d_gx), as
// dG [K, T*B, Gm], or with ``transposed`` as [S, K, Gm, T*B] (column t*B + b: step t,
// row b), S = 1, or 2 for the GRU (its hidden side, then its input side, d_gx's), written
// step by step while they are in cache: the weight gradients dW[k] = dG[k]^T x_k are then
// products of plain matrices (grnn_fairseq.kernels.onednn.weight_grad_t); d_bias_hh as
// always.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> scan_backward(
    const Tensor& fac, const Tensor& hs, const Tensor& weight_hh,
    const std::optional<Tensor>& mask_in, const std::optional<Tensor>& d_out_in,
    const std::optional<Tensor>& d_h, const std::optional<Tensor>& d_c, bool shuffle,
    bool reverse, int64_t cell, bool weight_grad, bool transposed) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(!(weight_grad && transposed),
              "backward: weight_grad and transposed exclude each other (the transposed gate "
              "gradients are returned in d_weight_hh's place)");
  const bool lstm = check_cell(cell) == kLSTM;
  const int64_t factors = factors_of(cell);
  TORCH_CHECK(fac.dim() == 4 && fac.size(3) % factors == 0 && fac.is_contiguous(), "bad fac");
  const int64_t K = fac.size(0), T = fac.size(1), B = fac.size(2), m = fac.size(3) / factors;
  const int64_t H = K * m, G = gates_of(cell) * m, F = factors * m;
  TORCH_CHECK(hs.dim() == 3 && hs.size(0) == T + 2 && hs.size(1) == B && hs.size(2) == H &&
              hs.is_contiguous(), "bad hs");
  const auto opt = fac.options();
  const Tensor w = weight_hh.contiguous();
  Tensor keep, d_out;
  if (mask_in.has_value() && mask_in->defined()) keep = mask_in->to(at::kBool).contiguous();
  if (d_out_in.has_value() && d_out_in->defined())
    d_out = d_out_in->reshape({T, B, H}).contiguous();
  auto init = [&](const std::optional<Tensor>& x) {  // a gradient given, or zeros
    Tensor y = empty_buffer({K, B, m}, opt);
    return x.has_value() && x->defined() ? y.copy_(*x) : y.zero_();
  };
  Tensor ph = init(d_h), mg = init(std::nullopt);
  Tensor gc = lstm ? init(d_c) : at::empty({0}, opt);
  Tensor dg = empty_buffer({K, T, B, G}, opt);
  Tensor dx = cell == kGRU ? empty_buffer({K, T, B, G}, opt) : dg;  // input side (GRU)
  const int64_t sides = cell == kGRU ? 2 : 1, N = T * B;
  Tensor dg_t = transposed ? empty_buffer({sides, K, G, N}, opt) : Tensor();
  // the transposes' tasks: (side, group, block of 64 gate rows)
  const int64_t t_blocks = blocks(G, 64), t_tasks = sides * K * t_blocks;
  const int64_t threads = at::get_num_threads();
  Tensor scratch = at::empty({shuffle ? threads : 0, H}, opt);
  Tensor dbias = at::zeros({threads, K, G}, opt.dtype(at::kDouble));
  bool named = false;
  const int isa = fused_isa(&named);
  const bool fused = use_fused_product(fac.scalar_type(), m, isa, named);
  if (fused) ++fused_backward_calls;
  AT_DISPATCH_FLOATING_TYPES(fac.scalar_type(), "grnn_rnn_backward", [&] {
    using T_ = scalar_t;
    Bwd<T_> a{};
    a.mg = mg.data_ptr<T_>();
    a.shuffle = shuffle;
    a.scratch = scratch.data_ptr<T_>();
    a.dbias = dbias.data_ptr<double>();
    a.threads = threads;
    a.fac_sk = T * B * F;
    a.dg_sk = T * B * G;
    a.ph = ph.data_ptr<T_>();
    a.gc = lstm ? gc.data_ptr<T_>() : nullptr;
    a.K = K;
    a.B = B;
    a.m = m;
    for (int64_t n = 0; n < T; ++n) {
      const int64_t t = reverse ? n : T - 1 - n;
      a.dout = d_out.defined() ? d_out.data_ptr<T_>() + t * B * H : nullptr;
      a.fac = fac.data_ptr<T_>() + t * B * F;
      a.dg = dg.data_ptr<T_>() + t * B * G;
      a.dx = cell == kGRU ? dx.data_ptr<T_>() + t * B * G : nullptr;
      a.keep = keep.defined() ? keep.data_ptr<bool>() + t * B : nullptr;
      at::parallel_for(0, B, grain(H), [&](int64_t s, int64_t e) { run_rows(a, cell, s, e); });
      if (transposed)
        at::parallel_for(0, t_tasks, std::max<int64_t>(1, 4096 / (64 * B)),
                         [&](int64_t s, int64_t e) {
          for (int64_t task = s; task < e; ++task) {
            const int64_t side = task / (K * t_blocks), k = task / t_blocks % K;
            const int64_t j0 = task % t_blocks * 64, j1 = std::min(j0 + 64, G);
            const T_* src = (side ? a.dx : a.dg) + k * a.dg_sk;
            T_* dst = dg_t.data_ptr<T_>() + (side * K + k) * G * N + t * B;
            transpose_step(src, B, G, dst, N, j0, j1, isa);
          }
        });
      if (fused) fused_product(mg, dg.select(1, t), w, isa);
      else grouped_mm(mg, dg.select(1, t), w);
    }
    a.fac = nullptr;  // d_h0 = ph + the gradient of the first step's operand
    at::parallel_for(0, B, grain(H), [&](int64_t s, int64_t e) { run_rows(a, cell, s, e); });
  });
  Tensor d_b = dbias.sum(0).to(fac.scalar_type());
  if (transposed) return {dx.transpose(0, 1), ph, gc, dg_t, d_b};
  if (!weight_grad) return {dx.transpose(0, 1), ph, gc, dg.view({K, T * B, G}), d_b};
  // dW_hh[k] = sum_t dG_t[k]^T h_in_t[k]: the operand slots of consecutive steps are one
  // [T*B, H] matrix whose grouped view the product reads in place
  const Tensor h_in = hs.narrow(0, reverse ? 2 : 0, T).view({T * B, H});
  Tensor d_w = at::bmm(dg.view({K, T * B, G}).transpose(1, 2), grouped(h_in, K));
  return {dx.transpose(0, 1), ph, gc, d_w, d_b};
}

}  // namespace

// cell: 0 LSTM (the default), 1 GRU, 2 Elman RNN (tanh)
TORCH_LIBRARY(grnn_rnn_cpu, lib) {
  lib.def("forward(Tensor[] gx, Tensor h0, Tensor? c0, Tensor weight_hh, Tensor bias_hh, "
          "Tensor? mask, bool shuffle, bool reverse, bool save, int cell=0) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
          &scan_forward);
  lib.def("fused_forward_calls() -> int", []() -> int64_t { return fused_calls.load(); });
  lib.def("fused_backward_calls() -> int",
          []() -> int64_t { return fused_backward_calls.load(); });
  // the fused step's vector unit and its lanes (floats per register) under GRNN_CPU_ISA
  lib.def("fused_isa() -> str", []() -> std::string { return ISA_NAMES[fused_isa()]; });
  lib.def("detected_isa() -> str", []() -> std::string { return ISA_NAMES[detected_isa()]; });
  lib.def("fused_lanes() -> int", []() -> int64_t { return lanes_of(fused_isa()); });
  lib.def("backward(Tensor fac, Tensor hs, Tensor weight_hh, Tensor? mask, Tensor? d_out, "
          "Tensor? d_h, Tensor? d_c, bool shuffle, bool reverse, int cell=0, "
          "bool weight_grad=True, bool transposed=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
          &scan_backward);
}
