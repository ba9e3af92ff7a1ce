// RNNSearch's additive attention of one target position on the CPU, fused (attention.py;
// the Triton kernels in triton_attention.py are the GPU's counterpart):
//
//   e_s = v . tanh(q + k_s)    alpha_s = softmax_s(e_s) (unmasked s)    c = sum_s alpha_s h_s
//
// (Bahdanau et al. 2015, Eq. 6 and A.1.2; q = W s_{i-1} + b, k_s = U h_s.)  Each query row
// reads its source's keys and values once in the forward and once in the backward; nothing
// of size [S, B, A] is made, where PyTorch's ops write and read the pre-activations,
// their tanh and their gradients several times per position.  The backward recomputes
// tanh(q + k_s) and ADDS the keys' gradient and the row's share of dv into the caller's
// buffers (a sequence of positions sums them in place: attention.py, KeyGrads).
//
// Shapes (all contiguous but the mask): q [B, A], keys [S, N, A], v [A], values [S, N, V],
// mask [S, N] (true = pad; read through its strides), B = N * E query rows, row b attending
// over source b / E (beam search's rows share their source).  weights (alpha) [S, B].
// Work is split by source, so a source's keys' gradient has one writer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

using at::Tensor;
using namespace grnn;

template <typename T>
struct Attention {
  const T *q, *keys, *v, *values;
  const bool* mask;  // null: no padding
  int64_t mask_s, mask_n;
  int64_t S, N, E, A, V;
  T *weights, *context;  // forward's outputs: [S, B], [B, V]
  const T *d_context, *d_weights;  // backward's inputs: [B, V], [S, B] or null
  T *d_q, *d_keys, *dv_rows;  // backward's outputs: [B, A]; added into: [S, N, A] or null, [B, A]

  bool pad(int64_t s, int64_t n) const { return mask && mask[s * mask_s + n * mask_n]; }
};

// v . tanh(q + k): one energy (the reduction vectorises with OpenMP's simd)
template <typename T>
GRNN_INLINE T energy(const T* q, const T* k, const T* v, int64_t A) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t a = 0; a < A; ++a) acc += v[a] * tanh_(q[a] + k[a]);
  return acc;
}

// t = tanh(x) and its slope 1 - t^2, the slope as 4 e / (1 + e)^2 with e = exp(-2x): no
// cancellation where the unit saturates (1 - t^2 from a rounded t loses its digits there).
// e r = e / (1 + e) <= 1 is formed first: 4 e alone overflows for x below about -44 (float).
template <typename T>
GRNN_INLINE void tanh_and_slope(T x, T& t, T& slope) {
  const T e = exp_(T(-2) * x);
  const T r = T(1) / (T(1) + e);
  t = T(2) * r - T(1);
  slope = T(4) * ((e * r) * r);
}

template <typename T>
GRNN_INLINE T dot(const T* x, const T* y, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] * y[i];
  return acc;
}

template <typename T>
GRNN_INLINE void forward_sources(const Attention<T>& p, int64_t n0, int64_t n1) {
  const int64_t B = p.N * p.E, NA = p.N * p.A, NV = p.N * p.V;
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<T> e(p.S);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < p.E; ++r) {
      const int64_t b = n * p.E + r;
      const T* q = p.q + b * p.A;
      T top = -inf;
      for (int64_t s = 0; s < p.S; ++s) {
        e[s] = p.pad(s, n) ? -inf : energy(q, p.keys + s * NA + n * p.A, p.v, p.A);
        top = std::max(top, e[s]);
      }
      T total = 0;
      for (int64_t s = 0; s < p.S; ++s) {
        e[s] = e[s] == -inf ? T(0) : exp_(e[s] - top);  // exactly 0 on the pads
        total += e[s];
      }
      T* c = p.context + b * p.V;
      std::fill(c, c + p.V, T(0));
      for (int64_t s = 0; s < p.S; ++s) {
        const T alpha = e[s] / total;
        p.weights[s * B + b] = alpha;
        if (alpha == T(0)) continue;
        const T* h = p.values + s * NV + n * p.V;
        GRNN_IVDEP
        for (int64_t i = 0; i < p.V; ++i) c[i] += alpha * h[i];
      }
    }
}

// d alpha_s = dc . h_s (+ the weights' own gradient), de_s = alpha_s (d alpha_s - sum_s
// alpha_s d alpha_s); with t = tanh(q + k_s): dq = sum_s de_s v (1 - t^2), dk_s += de_s v
// (1 - t^2), the row's dv += sum_s de_s t.  The de_s sum to zero, so dq is a sum of
// terms that cancel: it (and sum_s alpha_s d alpha_s) is accumulated in double; in float
// the query projection's gradient lost about 1e-4 of its size against float64, more than
// PyTorch's ops (results/cpu_fused_attention_numerics.txt).
template <typename T>
GRNN_INLINE void backward_sources(const Attention<T>& p, int64_t n0, int64_t n1) {
  const int64_t B = p.N * p.E, NA = p.N * p.A, NV = p.N * p.V;
  std::vector<T> de(p.S);
  std::vector<double> dqa(p.A);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < p.E; ++r) {
      const int64_t b = n * p.E + r;
      const T* dc = p.d_context + b * p.V;
      double mean = 0;
      for (int64_t s = 0; s < p.S; ++s) {
        const T alpha = p.weights[s * B + b];
        T da = alpha == T(0) ? T(0) : dot(dc, p.values + s * NV + n * p.V, p.V);
        if (p.d_weights) da += p.d_weights[s * B + b];
        de[s] = da;
        mean += alpha * da;
      }
      const T* q = p.q + b * p.A;
      T* dq = p.d_q + b * p.A;
      T* dv = p.dv_rows + b * p.A;
      std::fill(dqa.begin(), dqa.end(), 0.0);
      for (int64_t s = 0; s < p.S; ++s) {
        const T d = T(p.weights[s * B + b] * (de[s] - mean));
        if (d == T(0)) continue;  // the pads
        const T* k = p.keys + s * NA + n * p.A;
        if (p.d_keys) {
          T* dk = p.d_keys + s * NA + n * p.A;
          GRNN_IVDEP
          for (int64_t a = 0; a < p.A; ++a) {
            T t, dt;
            tanh_and_slope(q[a] + k[a], t, dt);
            const T g = d * p.v[a] * dt;
            dqa[a] += g;
            dk[a] += g;
            dv[a] += d * t;
          }
        } else {
          GRNN_IVDEP
          for (int64_t a = 0; a < p.A; ++a) {
            T t, dt;
            tanh_and_slope(q[a] + k[a], t, dt);
            dqa[a] += d * p.v[a] * dt;
            dv[a] += d * t;
          }
        }
      }
      for (int64_t a = 0; a < p.A; ++a) dq[a] = T(dqa[a]);
    }
}

// cloned for the vector widths (GCC does not multiversion templates)
#define GRNN_ATTENTION(T, t)                                                                \
  GRNN_CLONES void forward_##t(const Attention<T>& p, int64_t s, int64_t e) {               \
    forward_sources(p, s, e);                                                               \
  }                                                                                         \
  GRNN_CLONES void backward_##t(const Attention<T>& p, int64_t s, int64_t e) {              \
    backward_sources(p, s, e);                                                              \
  }
GRNN_ATTENTION(float, f)
GRNN_ATTENTION(double, d)
#undef GRNN_ATTENTION
inline void run(const Attention<float>& p, bool bwd, int64_t s, int64_t e) {
  bwd ? backward_f(p, s, e) : forward_f(p, s, e);
}
inline void run(const Attention<double>& p, bool bwd, int64_t s, int64_t e) {
  bwd ? backward_d(p, s, e) : forward_d(p, s, e);
}

void check(const Tensor& q, const Tensor& keys, const Tensor& v, const Tensor& values,
           int64_t rows) {
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && v.device().is_cpu() &&
                  values.device().is_cpu(), "attention_cpu: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && v.scalar_type() == keys.scalar_type() &&
                  values.scalar_type() == keys.scalar_type() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kDouble),
              "attention_cpu: q, keys, v and values must all be float32 or all float64");
  TORCH_CHECK(keys.dim() == 3 && values.dim() == 3 && q.dim() == 2 && v.dim() == 1 &&
                  rows >= 1 && q.size(0) == keys.size(1) * rows && q.size(1) == keys.size(2) &&
                  v.size(0) == keys.size(2) && values.size(0) == keys.size(0) &&
                  values.size(1) == keys.size(1),
              "attention_cpu: bad shapes");
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && v.is_contiguous() &&
                  values.is_contiguous(),
              "attention_cpu: q, keys, v and values must be contiguous");
}

template <typename T>
Attention<T> problem(const Tensor& q, const Tensor& keys, const Tensor& v, const Tensor& values,
                     const Tensor& mask, int64_t rows) {
  Attention<T> p{};
  p.q = q.data_ptr<T>();
  p.keys = keys.data_ptr<T>();
  p.v = v.data_ptr<T>();
  p.values = values.data_ptr<T>();
  if (mask.defined()) {
    p.mask = mask.data_ptr<bool>();
    p.mask_s = mask.stride(0);
    p.mask_n = mask.stride(1);
  }
  p.S = keys.size(0), p.N = keys.size(1), p.E = rows, p.A = keys.size(2), p.V = values.size(2);
  return p;
}

Tensor mask_of(const c10::optional<Tensor>& mask, const Tensor& keys) {
  if (!mask.has_value() || !mask->defined()) return Tensor();
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == keys.size(0) && mask->size(1) == keys.size(1),
              "attention_cpu: the mask must be [S, N]");
  return mask->scalar_type() == at::kBool ? *mask : mask->to(at::kBool);
}

// sources per parallel task: at least ~2^15 tanh, so that small problems stay serial
int64_t grain(int64_t rows, int64_t S, int64_t A) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(rows * S * A, 1));
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& keys,
                                             const Tensor& v, const Tensor& values,
                                             const c10::optional<Tensor>& mask, int64_t rows) {
  check(q, keys, v, values, rows);
  const Tensor pad = mask_of(mask, keys);
  Tensor weights = at::empty({keys.size(0), q.size(0)}, q.options());
  Tensor context = at::empty({q.size(0), values.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_forward", [&] {
    Attention<scalar_t> p = problem<scalar_t>(q, keys, v, values, pad, rows);
    p.weights = weights.data_ptr<scalar_t>();
    p.context = context.data_ptr<scalar_t>();
    at::parallel_for(0, p.N, grain(rows, p.S, p.A),
                     [&](int64_t s, int64_t e) { run(p, false, s, e); });
  });
  return {context, weights};
}

// -> dq [B, A]; adds the keys' gradient into d_keys (if given) and the rows' shares of dv
// into dv_rows [B, A].  No mask: alpha is 0 on the pads, and so is their gradient.
Tensor attention_backward(const Tensor& d_context, const c10::optional<Tensor>& d_weights,
                          const Tensor& weights, const Tensor& q, const Tensor& keys,
                          const Tensor& v, const Tensor& values,
                          const c10::optional<Tensor>& d_keys, const Tensor& dv_rows,
                          int64_t rows) {
  check(q, keys, v, values, rows);
  const int64_t B = q.size(0);
  const Tensor dc = d_context.contiguous();
  const bool has_dw = d_weights.has_value() && d_weights->defined();
  const Tensor dw = has_dw ? d_weights->contiguous() : Tensor();
  const bool has_dk = d_keys.has_value() && d_keys->defined();
  TORCH_CHECK(dc.sizes() == at::IntArrayRef({B, values.size(2)}) &&
                  weights.sizes() == at::IntArrayRef({keys.size(0), B}) &&
                  weights.is_contiguous() &&
                  (!has_dw || dw.sizes() == weights.sizes()) &&
                  (!has_dk || (d_keys->sizes() == keys.sizes() && d_keys->is_contiguous())) &&
                  dv_rows.sizes() == q.sizes() && dv_rows.is_contiguous(),
              "attention_cpu: bad shapes in the backward");
  for (const Tensor* t : {&dc, &weights, &dw, &dv_rows})
    TORCH_CHECK(!t->defined() || t->scalar_type() == q.scalar_type(),
                "attention_cpu: the backward's tensors must have q's dtype");
  TORCH_CHECK(!has_dk || d_keys->scalar_type() == q.scalar_type(),
              "attention_cpu: the keys' gradient must have q's dtype");
  Tensor d_q = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward", [&] {
    Attention<scalar_t> p = problem<scalar_t>(q, keys, v, values, Tensor(), rows);
    p.weights = weights.data_ptr<scalar_t>();
    p.d_context = dc.data_ptr<scalar_t>();
    p.d_weights = has_dw ? dw.data_ptr<scalar_t>() : nullptr;
    p.d_q = d_q.data_ptr<scalar_t>();
    p.d_keys = has_dk ? d_keys->data_ptr<scalar_t>() : nullptr;
    p.dv_rows = dv_rows.data_ptr<scalar_t>();
    at::parallel_for(0, p.N, grain(rows, p.S, p.A),
                     [&](int64_t s, int64_t e) { run(p, true, s, e); });
  });
  return d_q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(grnn_rnn_cpu, lib) {
  lib.def("attention_forward(Tensor q, Tensor keys, Tensor v, Tensor values, Tensor? mask, "
          "int rows) -> (Tensor, Tensor)",
          &attention_forward);
  lib.def("attention_backward(Tensor d_context, Tensor? d_weights, Tensor weights, Tensor q, "
          "Tensor keys, Tensor v, Tensor values, Tensor(a!)? d_keys, "
          "Tensor(b!) dv_rows, int rows) -> Tensor",
          &attention_backward);
}
