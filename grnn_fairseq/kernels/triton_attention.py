"""RNNSearch's additive attention for one target position as one Triton kernel each way.

    e_ij = v^T tanh(q_i + k_j)      alpha_ij = softmax_j(e_ij)      c_i = sum_j alpha_ij h_j

(Bahdanau et al. 2015, Eq. 6 and A.1.2; q_i = W s_{i-1} + b, k_j = U h_j.)  The decoder of
RNNSearch attends once per target position, in training too (input feeding), and in PyTorch
ops that is about 8 launches forward and 11 backward per position besides the query
projection, each a few microseconds of host time on a GPU, where the arithmetic takes less
(``results/gpu_h100/step_launches.txt``).  Here (``GRNN_TRITON_ATTENTION=1``):

* forward (:func:`_attention_fwd`), one program per query row: the energies in fp32
  blocks of (sources x attention units), the mask, an online softmax (running maximum and
  sum), then the context in blocks of value units.  The energies go to an fp32 scratch
  buffer, and alpha to the fp32 weights, which are saved for the backward.
* backward (:func:`_attention_bwd`), one program per query row: d alpha_j = dc_i . h_j
  (plus any gradient of the returned weights), de_j = alpha_j (d alpha_j - sum_j alpha_j
  d alpha_j), and with t = tanh(q_i + k_j) recomputed (nothing of size [S, B, A] is
  saved): dq_i = sum_j de_j v (1 - t^2), the keys' gradient de_j v (1 - t^2), and the
  row's share of dv = sum_j de_j t (summed over the rows on the host: deterministic, no
  atomics).
* the gradients of the keys and of v of a sequence of positions (``attention.sequence_keys``,
  training) are added in place into fp32 buffers by every position's backward kernel,
  instead of autograd making and adding an [S, B, A] tensor per position; the values'
  gradient is handed to the attention's ``ValueGrads`` (``attention.py``) as the PyTorch
  path does.  Both hand-overs happen only if autograd will run the sequence's node in the
  same backward (as in ``triton_rnn._TritonStep``).

The query projection stays a cuBLAS product (its weight gradients once per sequence:
``AdditiveAttention.sequence_projection``).  Every size (sources, rows, units) is a
runtime value: nothing recompiles per batch.  Beam search's rows share their source's
keys and values (``rows_per_source``); with a gradient of the keys (training) the rows
must be one per source, since each program then owns its source's keys' gradient.
"""
import os
import sys

import torch
import triton
import triton.language as tl

from ..errors import switch

BLOCK_S, BLOCK_A, BLOCK_V = 16, 64, 64

# GRNN_TRITON_ATTENTION=0|1: RNNSearch's attention runs as these kernels where the
# recurrence runs on Triton (off until timed on a GPU: scripts/gpu-checks.sh).
VARIANT = {"attention": os.environ.get("GRNN_TRITON_ATTENTION", "0")}


def attention_on():
    """Whether VARIANT['attention'] is on (GRNN_TRITON_ATTENTION, checked)."""
    return switch("GRNN_TRITON_ATTENTION", VARIANT["attention"])


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _energy_tile(q_row, k_ptr, v_ptr, offs_s, ms, n, N, A, a0, BLOCK_A: tl.constexpr):
    """t = tanh(q + k) for one block of sources x attention units, in fp32, and v."""
    offs_a = a0 + tl.arange(0, BLOCK_A)
    ma = offs_a < A
    q = tl.load(q_row + offs_a, mask=ma, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs_a, mask=ma, other=0.0).to(tl.float32)
    rows = (offs_s.to(tl.int64) * N + n) * A
    mk = ms[:, None] & ma[None, :]
    k = tl.load(k_ptr + rows[:, None] + offs_a[None, :], mask=mk, other=0.0).to(tl.float32)
    return _tanh(k + q[None, :]), v, offs_a, ma, rows, mk


@triton.jit(do_not_specialize=["B", "S", "N", "E", "A", "V", "sm_s", "sm_n"])
def _attention_fwd(q_ptr, k_ptr, v_ptr, val_ptr, mask_ptr, e_ptr, w_ptr, ctx_ptr,
                   B, S, N, E, A, V, sm_s, sm_n, HAS_MASK: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row r of q [B, A] over source n = r // E of keys [S, N, A], values [S, N, V], mask
    [S, N] (nonzero = pad; strides sm_s, sm_n) -> w [S, B] fp32 (alpha) and ctx [B, V];
    e [S, B] fp32 is scratch (the energies: alpha is written apart from them, so that no
    thread reads an element that another has already overwritten)."""
    r = tl.program_id(0)
    n = r // E
    q_row = q_ptr + r.to(tl.int64) * A
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ms = offs_s < S
        e = tl.zeros([BLOCK_S], tl.float32)
        for a0 in range(0, A, BLOCK_A):
            t, v, offs_a, ma, rows, mk = _energy_tile(q_row, k_ptr, v_ptr, offs_s, ms, n, N,
                                                       A, a0, BLOCK_A)
            e += tl.sum(t * v[None, :], axis=1)
        valid = ms
        if HAS_MASK:
            pad = tl.load(mask_ptr + offs_s.to(tl.int64) * sm_s + n * sm_n, mask=ms, other=1)
            valid = ms & (pad == 0)
        e = tl.where(valid, e, float("-inf"))
        tl.store(e_ptr + offs_s.to(tl.int64) * B + r, e, mask=ms)
        m_new = tl.maximum(m_run, tl.max(e, axis=0))
        # blocks of pads only (left padding) leave the maximum at -inf: shift by 0 there
        # (the sum stays 0); every source has a real token (its EOS), so it ends finite
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_run = l_run * tl.exp(m_run - shift) + tl.sum(tl.exp(e - shift), axis=0)
        m_run = m_new
    tl.debug_barrier()  # the energies written above are read back by other threads
    inv = 1.0 / l_run
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ms = offs_s < S
        w_off = offs_s.to(tl.int64) * B + r
        e = tl.load(e_ptr + w_off, mask=ms, other=float("-inf"))
        tl.store(w_ptr + w_off, tl.exp(e - m_run) * inv, mask=ms)
    tl.debug_barrier()
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mv = offs_v < V
        acc = tl.zeros([BLOCK_V], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            ms = offs_s < S
            alpha = tl.load(w_ptr + offs_s.to(tl.int64) * B + r, mask=ms, other=0.0)
            rows = (offs_s.to(tl.int64) * N + n) * V
            h = tl.load(val_ptr + rows[:, None] + offs_v[None, :],
                        mask=ms[:, None] & mv[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(alpha[:, None] * h, axis=0)
        tl.store(ctx_ptr + r.to(tl.int64) * V + offs_v, acc.to(ctx_ptr.dtype.element_ty),
                 mask=mv)


@triton.jit(do_not_specialize=["B", "S", "N", "E", "A", "V"])
def _attention_bwd(dctx_ptr, dw_ptr, w_ptr, q_ptr, k_ptr, v_ptr, val_ptr, da_ptr, dq_ptr,
                   dk_ptr, dv_ptr, B, S, N, E, A, V, HAS_DW: tl.constexpr, KEYS: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_V: tl.constexpr):
    """The backward of :func:`_attention_fwd` for row r: dq [B, A], the row's dv [B, A]
    (fp32) and, KEYS = 1 stored or 2 added in place (dv too), the keys' gradient dk
    [S, N, A] (fp32); da [S, B] fp32 is scratch."""
    r = tl.program_id(0)
    n = r // E
    r64 = r.to(tl.int64)
    q_row = q_ptr + r64 * A
    dot = tl.zeros([1], tl.float32)  # sum_j alpha_j d alpha_j
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ms = offs_s < S
        w_off = offs_s.to(tl.int64) * B + r
        da = tl.zeros([BLOCK_S], tl.float32)
        rows = (offs_s.to(tl.int64) * N + n) * V
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mv = offs_v < V
            dc = tl.load(dctx_ptr + r64 * V + offs_v, mask=mv, other=0.0).to(tl.float32)
            h = tl.load(val_ptr + rows[:, None] + offs_v[None, :],
                        mask=ms[:, None] & mv[None, :], other=0.0).to(tl.float32)
            da += tl.sum(h * dc[None, :], axis=1)
        if HAS_DW:
            da += tl.load(dw_ptr + w_off, mask=ms, other=0.0).to(tl.float32)
        alpha = tl.load(w_ptr + w_off, mask=ms, other=0.0)
        tl.store(da_ptr + w_off, da, mask=ms)
        dot += tl.sum(alpha * da, axis=0)
    tl.debug_barrier()
    for a0 in range(0, A, BLOCK_A):
        dq = tl.zeros([BLOCK_A], tl.float32)
        dv = tl.zeros([BLOCK_A], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            ms = offs_s < S
            w_off = offs_s.to(tl.int64) * B + r
            alpha = tl.load(w_ptr + w_off, mask=ms, other=0.0)
            da = tl.load(da_ptr + w_off, mask=ms, other=0.0)
            de = alpha * (da - dot)  # 0 at padded sources, whose alpha is 0
            t, v, offs_a, ma, rows, mk = _energy_tile(q_row, k_ptr, v_ptr, offs_s, ms, n, N,
                                                       A, a0, BLOCK_A)
            dt = de[:, None] * v[None, :] * (1.0 - t * t)
            dq += tl.sum(dt, axis=0)
            dv += tl.sum(de[:, None] * t, axis=0)
            if KEYS == 1:
                tl.store(dk_ptr + rows[:, None] + offs_a[None, :], dt, mask=mk)
            if KEYS == 2:
                dk = dk_ptr + rows[:, None] + offs_a[None, :]
                tl.store(dk, tl.load(dk, mask=mk, other=0.0) + dt, mask=mk)
        offs_a = a0 + tl.arange(0, BLOCK_A)
        ma = offs_a < A
        tl.store(dq_ptr + r64 * A + offs_a, dq.to(dq_ptr.dtype.element_ty), mask=ma)
        if KEYS == 2:
            dv += tl.load(dv_ptr + r64 * A + offs_a, mask=ma, other=0.0)
        tl.store(dv_ptr + r64 * A + offs_a, dv, mask=ma)


def sum_dtype(dtype):
    """The dtype in which a sequence's keys' and v's gradients are summed: fp32."""
    return torch.float32


def forward(q, keys, v, values, mask, rows):
    """q [B, A], keys [S, N, A], v [A], values [S, N, V] (contiguous), mask [S, N] or None
    (True = pad) -> (context [B, V] in the values' dtype, alpha [S, B] fp32)."""
    s, n, a = keys.shape
    b, vdim = q.shape[0], values.shape[2]
    weights = torch.empty(s, b, dtype=torch.float32, device=q.device)
    context = torch.empty(b, vdim, dtype=values.dtype, device=q.device)
    # the mask is read through its strides (fairseq's is a transposed view)
    pad = mask.view(torch.uint8) if mask is not None else weights
    _attention_fwd[(b,)](q, keys, v, values, pad, torch.empty_like(weights), weights,
                         context, b, s, n, rows, a, vdim,
                         *(pad.stride() if mask is not None else (0, 0)),
                         HAS_MASK=mask is not None, BLOCK_S=BLOCK_S, BLOCK_A=BLOCK_A,
                         BLOCK_V=BLOCK_V)
    return context, weights


def backward(d_context, d_weights, weights, q, keys, v, values, rows, keys_mode, d_keys,
             dv_rows):
    """-> (dq [B, A], d_keys, dv_rows [B, A] fp32).  keys_mode 0: no keys' gradient; 1: a
    new one; 2: added into ``d_keys``, and the rows' shares of dv into ``dv_rows`` (a
    sequence's sums).  A keys' gradient needs one query row per source."""
    s, n, a = keys.shape
    b, vdim = q.shape[0], values.shape[2]
    if keys_mode and rows != 1:
        raise ValueError("fused attention: the keys' gradient needs one query row per "
                         f"source, got {rows}")
    if keys_mode == 1:
        d_keys = torch.empty(s, n, a, dtype=torch.float32, device=q.device)
    if dv_rows is None:
        dv_rows = torch.empty(b, a, dtype=torch.float32, device=q.device)
    d_q = torch.empty_like(q)
    dw = d_weights.contiguous() if d_weights is not None else weights
    _attention_bwd[(b,)](d_context.contiguous(), dw, weights, q, keys, v, values,
                         torch.empty_like(weights), d_q,
                         d_keys if d_keys is not None else weights, dv_rows,
                         b, s, n, rows, a, vdim, HAS_DW=d_weights is not None,
                         KEYS=keys_mode, BLOCK_S=BLOCK_S, BLOCK_A=BLOCK_A, BLOCK_V=BLOCK_V)
    return d_q, d_keys, dv_rows


def attention_triton(q, keys, v, values, padding_mask=None, rows_per_source=1,
                     key_grads=None, value_grads=None):
    """q [B, A] (W s + b), keys [S, N, A], v [A], values [S, N, V], padding_mask [S, N]
    (True = pad), B = N * rows_per_source -> (context [B, V] in the values' dtype, alpha
    [S, B] fp32).  key_grads / value_grads: from ``attention.sequence_keys`` and
    ``AdditiveAttention.sequence_values``, with the keys and values they returned."""
    from ..attention import fused_attention

    return fused_attention(sys.modules[__name__], q, keys, v, values, padding_mask,
                           rows_per_source, key_grads, value_grads)


def compile_check(arch=90, dtypes=("bf16", "fp32")):
    """Compile both kernels for a CUDA target, every feature on (see
    ``triton_rnn.compile_check``) -> the number compiled."""
    from .triton_rnn import compile_kernel

    n = 0
    blocks = dict(BLOCK_S=BLOCK_S, BLOCK_A=BLOCK_A, BLOCK_V=BLOCK_V)
    for dt in dtypes:
        compile_kernel(_attention_fwd, dict(
            q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", val_ptr=f"*{dt}", mask_ptr="*u8",
            e_ptr="*fp32", w_ptr="*fp32", ctx_ptr=f"*{dt}"), dict(blocks, HAS_MASK=True), arch)
        compile_kernel(_attention_bwd, dict(
            dctx_ptr=f"*{dt}", dw_ptr="*fp32", w_ptr="*fp32", q_ptr=f"*{dt}", k_ptr=f"*{dt}",
            v_ptr=f"*{dt}", val_ptr=f"*{dt}", da_ptr="*fp32", dq_ptr=f"*{dt}", dk_ptr="*fp32",
            dv_ptr="*fp32"), dict(blocks, HAS_DW=True, KEYS=2), arch)
        n += 2
    return n
