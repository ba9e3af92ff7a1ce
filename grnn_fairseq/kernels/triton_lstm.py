"""Group LSTM recurrence in Triton: persistent forward and backward kernels, and a fused
decoding step.

Design
------
**One launch per sequence** (forward; the backward adds one launch for dh_0).  A fixed
grid of P programs (P <= the number of SMs, so that all are resident at once) loops over
the time steps inside the kernel; each program owns the same tiles at every step.  With
the time-step shuffle every group reads h_{t-1} of *every* group, so programs meet at a
grid-wide barrier between steps (:func:`_grid_sync`: an atomic counter in global memory,
release on arrival, acquire while waiting; state loads bypass L1).  A barrier that waits
far too long (programs not co-resident, e.g. SMs taken by another process) gives up and
raises a flag; the host turns it into an error instead of returning wrong numbers.

* forward tile (:func:`_fwd_tile`), tile = (batch tile, group k, tile of m units):
  the recurrent product of those units' four gate rows with h_{t-1} **read through the
  shuffle index** (``src = (q % K) * m + q // K`` computed in the kernel; no permuted copy
  of h is ever made), + the input projection gx[t] and b_hh, the gate non-linearities,
  c_t, h_t, the padding mask (padded steps keep the state and output zeros), and the
  stores: output h_t, states (h_t, c_t) and, for training, the activations.
* backward tile (:func:`_bwd_tile`), tile = (batch tile, group k, tile of m operand
  positions q): the product dG_{t+1}[k] W_hh[k] for those positions (the gradient of
  the shuffled operand), mapped back to the units that fed them (``u = src(q)``), then
  the LSTM backward at time t for exactly those units: gate gradients dG_t, the carried
  dc, and the pass-through gradients of padded steps.  Each unit is owned by one tile,
  so the in-place updates of the carried gradients are race free.  After the last step a
  pass with ``DO_CELL=False`` turns dG_0 W_hh into dh_0.
* decoding (:func:`_lstm_decode_step`): one launch per layer and step computes
  x_t W_ih^T + b_ih + shuffle(h_{t-1}) W_hh^T + b_hh, the cell, and writes h_t in both
  the state layout [K, B, m] and the output layout [B, H].

The large products without a sequential dependency stay in cuBLAS: the input projection
(``engine.project_input``) and dW_hh = sum_t dG_t^T h_in_t (one batched product after the
loop; h_in_t = the states gathered in shuffled order).

States and carried gradients are fp32 buffers whatever the input dtype; products take
their operands in the weights' dtype (bf16/fp16 tensor cores, or fp32 with TF32 exactly
when ``torch.backends.cuda.matmul.allow_tf32`` allows it) and accumulate in fp32.

Recompilation: T, B, P and the step counters are runtime arguments excluded from
Triton's integer specialisation, so neither the batch size nor the sequence length
recompiles; the block sizes come from a few buckets of (B, m).  Variants are compiled per
(dtype, m, K, shuffle, mask, training) only.

Under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tests) programs run one after the
other, so a barrier between them could never be met: there the grid is one program that
walks every tile (the same code, the barrier trivially passed).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from ..engine import _interpreting

# spins of a barrier before it gives up (each spin is one atomic read of L2, ~1 us):
# far beyond any real step (microseconds), short enough that a broken launch ends in ~1 s
_SPIN_LIMIT = tl.constexpr(1 << 20)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _grid_sync(sync_ptr, err_ptr, target, limit):
    """Grid-wide barrier number n: ``target`` = n * P.  The counter only grows, so no reset
    is needed between barriers.  Waits at most ``limit`` spins; a wait that gives up sets
    the sticky flag err_ptr and returns limit 0, so that the launch's later barriers do
    not wait again (the launch is then finished quickly, and reported by the host)."""
    tl.debug_barrier()                                   # this program's stores are issued
    tl.atomic_add(sync_ptr, 1, sem="release")
    seen = tl.atomic_add(sync_ptr, 0, sem="acquire")
    spins = tl.full([], 0, tl.int32)
    while (seen < target) & (spins < limit):
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire")
        spins += 1
    if seen < target:
        tl.atomic_max(err_ptr, 1)
        limit = limit * 0
    tl.debug_barrier()
    return limit


@triton.jit
def _add_gate_products(acc_i, acc_f, acc_g, acc_o, a, w_ptrs, w_mask, gate_stride,
                       PRECISION: tl.constexpr):
    """acc_gate += a @ W_gate for the four gates (i, f, g, o): ``w_ptrs`` points at gate i's
    [R, J] weight tile, each next gate ``gate_stride`` elements further."""
    acc_i += tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), input_precision=PRECISION)
    acc_f += tl.dot(a, tl.load(w_ptrs + gate_stride, mask=w_mask, other=0.0),
                    input_precision=PRECISION)
    acc_g += tl.dot(a, tl.load(w_ptrs + 2 * gate_stride, mask=w_mask, other=0.0),
                    input_precision=PRECISION)
    acc_o += tl.dot(a, tl.load(w_ptrs + 3 * gate_stride, mask=w_mask, other=0.0),
                    input_precision=PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _bias_sum(b1_ptr, b2_ptr, offs, mask):
    """b1[offs] + b2[offs] in fp32."""
    return (tl.load(b1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            + tl.load(b2_ptr + offs, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _tile(pid_b, pid_u, B, M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    """Tile (pid_b, pid_u) -> its group k, batch rows and unit (or operand) columns within
    the group, with their bounds masks."""
    n_jt = (M + BLOCK_J - 1) // BLOCK_J
    k = pid_u // n_jt
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = (pid_u % n_jt) * BLOCK_J + tl.arange(0, BLOCK_J)
    return k, offs_b, offs_j, offs_b < B, offs_j < M


@triton.jit
def _src_unit(q, K: tl.constexpr, M: tl.constexpr, SHUFFLE: tl.constexpr):
    """The unit that the time-step shuffle puts at operand position q (rearrange())."""
    if SHUFFLE:
        return (q % K) * M + q // K
    else:
        return q


@triton.jit
def _fwd_tile(
    pid_b, pid_u, gx_ptr, stride_gx_t, stride_gx_k, stride_gx_b,
    w_ptr, b_ptr, h_ptr, c_ptr, out_ptr, act_ptr, mask_ptr,
    t, s_in, s_out, B, T,
    K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One forward step t for one tile: Eq. (1)-(5) of the LSTM on the group's units."""
    H = K * M
    G = 4 * M
    k, offs_b, offs_j, mask_b, mask_j = _tile(pid_b, pid_u, B, M, BLOCK_B, BLOCK_J)
    row_b = offs_b.to(tl.int64) * H

    acc_i = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    w_base = w_ptr + k.to(tl.int64) * G * M
    h_base = h_ptr + s_in.to(tl.int64) * B * H
    for r0 in range(0, M, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < M
        src = _src_unit(k * M + offs_r, K, M, SHUFFLE)
        hp = tl.load(h_base + row_b[:, None] + src[None, :],
                     mask=mask_b[:, None] & mask_r[None, :], other=0.0, cache_modifier=".cg")
        hp = hp.to(w_ptr.dtype.element_ty)
        w_off = offs_j[None, :] * M + offs_r[:, None]     # W_hh[k, gate*M + j, r] as [r, j]
        w_mask = mask_r[:, None] & mask_j[None, :]
        acc_i, acc_f, acc_g, acc_o = _add_gate_products(
            acc_i, acc_f, acc_g, acc_o, hp, w_base + w_off, w_mask, M * M, PRECISION)

    bm = mask_b[:, None] & mask_j[None, :]
    gx_base = (gx_ptr + t.to(tl.int64) * stride_gx_t + k.to(tl.int64) * stride_gx_k
               + offs_b.to(tl.int64)[:, None] * stride_gx_b + offs_j[None, :])
    b_base = b_ptr + k * G + offs_j
    gi = acc_i + tl.load(gx_base, mask=bm, other=0.0).to(tl.float32) \
        + tl.load(b_base, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    gf = acc_f + tl.load(gx_base + M, mask=bm, other=0.0).to(tl.float32) \
        + tl.load(b_base + M, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    gg = acc_g + tl.load(gx_base + 2 * M, mask=bm, other=0.0).to(tl.float32) \
        + tl.load(b_base + 2 * M, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    go = acc_o + tl.load(gx_base + 3 * M, mask=bm, other=0.0).to(tl.float32) \
        + tl.load(b_base + 3 * M, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    i = _sigmoid(gi)
    f = _sigmoid(gf)
    g = _tanh(gg)
    o = _sigmoid(go)

    unit = row_b[:, None] + (k * M + offs_j)[None, :]        # [B, H] offsets, unit order
    c_prev = tl.load(c_ptr + s_in.to(tl.int64) * B * H + unit, mask=bm, other=0.0,
                     cache_modifier=".cg")
    c_new = f * c_prev + i * g
    h_new = o * _tanh(c_new)
    if HAS_MASK:
        keep = tl.load(mask_ptr + t * B + offs_b, mask=mask_b, other=0) != 0
        keep = keep[:, None]
        h_prev = tl.load(h_base + unit, mask=bm, other=0.0, cache_modifier=".cg")
        h_state = tl.where(keep, h_new, h_prev)
        c_state = tl.where(keep, c_new, c_prev)
        h_emit = tl.where(keep, h_new, 0.0)
    else:
        h_state = h_new
        c_state = c_new
        h_emit = h_new
    tl.store(h_ptr + s_out.to(tl.int64) * B * H + unit, h_state, mask=bm)
    tl.store(c_ptr + s_out.to(tl.int64) * B * H + unit, c_state, mask=bm)
    tl.store(out_ptr + t.to(tl.int64) * B * H + unit,
             h_emit.to(out_ptr.dtype.element_ty), mask=bm)
    if SAVE:
        # activations, [K, T, B, 4M]
        a_base = (act_ptr + ((k.to(tl.int64) * T + t) * B + offs_b.to(tl.int64))[:, None] * G
                  + offs_j[None, :])
        tl.store(a_base, i, mask=bm)
        tl.store(a_base + M, f, mask=bm)
        tl.store(a_base + 2 * M, g, mask=bm)
        tl.store(a_base + 3 * M, o, mask=bm)


@triton.jit(do_not_specialize=["B", "T", "P", "stride_gx_t", "stride_gx_k", "stride_gx_b"])
def _lstm_fwd(
    gx_ptr, stride_gx_t, stride_gx_k, stride_gx_b,
    w_ptr, b_ptr, h_ptr, c_ptr, out_ptr, act_ptr, mask_ptr, sync_ptr, err_ptr,
    B, T, P,
    K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The whole forward scan: P programs, a barrier between time steps.
    State slots: with SAVE every time has its slot (t, or t + 2 reversed; the backward
    reads them), else two slots used in turn."""
    pid = tl.program_id(0)
    n_u = K * ((M + BLOCK_J - 1) // BLOCK_J)
    n_tiles = ((B + BLOCK_B - 1) // BLOCK_B) * n_u
    limit = tl.full([], _SPIN_LIMIT, tl.int32)
    for step in range(0, T):
        if REVERSE:
            t = T - 1 - step
        else:
            t = step
        if SAVE:
            if REVERSE:
                s_in = t + 2
            else:
                s_in = t
            s_out = t + 1
        else:
            s_in = step % 2
            s_out = 1 - s_in
        for tile in range(pid, n_tiles, P):
            _fwd_tile(tile // n_u, tile % n_u, gx_ptr, stride_gx_t, stride_gx_k, stride_gx_b,
                      w_ptr, b_ptr, h_ptr, c_ptr, out_ptr, act_ptr, mask_ptr,
                      t, s_in, s_out, B, T, K, M, SHUFFLE, HAS_MASK, SAVE,
                      BLOCK_B, BLOCK_J, BLOCK_R, PRECISION)
        limit = _grid_sync(sync_ptr, err_ptr, (step + 1) * P, limit)


@triton.jit
def _bwd_tile(
    pid_b, pid_u, dg_ptr, w_ptr, act_ptr, c_ptr, dout_ptr, stride_do_t, stride_do_b,
    stride_do_u, ph_ptr, gc_ptr, mask_ptr, dh0_ptr,
    t, t_next, n_red, c_in, c_out, B, T,
    K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOUT: tl.constexpr,
    DO_CELL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One backward step t for one tile (operand positions q of group k)."""
    H = K * M
    G = 4 * M
    # offs_j: operand positions in group k
    k, offs_b, offs_j, mask_b, mask_j = _tile(pid_b, pid_u, B, M, BLOCK_B, BLOCK_J)
    offs_b64 = offs_b.to(tl.int64)

    # gradient of the operand h_in[k, :, j] of the step processed before (time t_next):
    # dG_{t_next}[k] @ W_hh[k]   (n_red = 0 at the first processed step: no such step)
    acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    dg_next = dg_ptr + ((k.to(tl.int64) * T + t_next) * B + offs_b64)[:, None] * G
    w_base = w_ptr + k.to(tl.int64) * G * M
    for n0 in range(0, n_red, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < G
        a = tl.load(dg_next + offs_n[None, :], mask=mask_b[:, None] & mask_n[None, :],
                    other=0.0, cache_modifier=".cg")
        w = tl.load(w_base + offs_n[:, None] * M + offs_j[None, :],
                    mask=mask_n[:, None] & mask_j[None, :], other=0.0)
        acc += tl.dot(a.to(w_ptr.dtype.element_ty), w, input_precision=PRECISION)

    u = _src_unit(k * M + offs_j, K, M, SHUFFLE)   # the unit read at operand position q
    bm = mask_b[:, None] & mask_j[None, :]
    unit = offs_b64[:, None] * H + u[None, :]
    s_h = acc + tl.load(ph_ptr + unit, mask=bm, other=0.0, cache_modifier=".cg")  # dL/dh_t
    if DO_CELL:
        ku = u // M
        ju = u % M
        a_base = (act_ptr + ((ku.to(tl.int64)[None, :] * T + t) * B + offs_b64[:, None]) * G
                  + ju[None, :])
        i = tl.load(a_base, mask=bm, other=0.0, cache_modifier=".cg")
        f = tl.load(a_base + M, mask=bm, other=0.0, cache_modifier=".cg")
        g = tl.load(a_base + 2 * M, mask=bm, other=0.0, cache_modifier=".cg")
        o = tl.load(a_base + 3 * M, mask=bm, other=0.0, cache_modifier=".cg")
        c_prev = tl.load(c_ptr + c_in.to(tl.int64) * B * H + unit, mask=bm, other=0.0,
                         cache_modifier=".cg")
        c_now = tl.load(c_ptr + c_out.to(tl.int64) * B * H + unit, mask=bm, other=0.0,
                        cache_modifier=".cg")
        gc = tl.load(gc_ptr + unit, mask=bm, other=0.0, cache_modifier=".cg")
        dh = s_h
        if HAS_DOUT:
            d_o = tl.load(dout_ptr + t.to(tl.int64) * stride_do_t + offs_b64[:, None] * stride_do_b
                          + u.to(tl.int64)[None, :] * stride_do_u, mask=bm, other=0.0)
            dh = dh + d_o.to(tl.float32)
        if HAS_MASK:
            keep = (tl.load(mask_ptr + t * B + offs_b, mask=mask_b, other=0) != 0)
            keep = keep.to(tl.float32)[:, None]
            ph_new = s_h * (1.0 - keep)        # a padded step passes dh to h_{t-1}
            dh = dh * keep
        else:
            ph_new = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
        tc = _tanh(c_now)
        dc = gc + dh * o * (1.0 - tc * tc)
        if HAS_MASK:
            dc = dc * keep
            gc_new = dc * f + gc * (1.0 - keep)
        else:
            gc_new = dc * f
        d_i = dc * g * i * (1.0 - i)
        d_f = dc * c_prev * f * (1.0 - f)
        d_g = dc * i * (1.0 - g * g)
        d_o = dh * tc * o * (1.0 - o)
        dg_t = (dg_ptr + ((ku.to(tl.int64)[None, :] * T + t) * B + offs_b64[:, None]) * G
                + ju[None, :])
        out_ty = dg_ptr.dtype.element_ty
        tl.store(dg_t, d_i.to(out_ty), mask=bm)
        tl.store(dg_t + M, d_f.to(out_ty), mask=bm)
        tl.store(dg_t + 2 * M, d_g.to(out_ty), mask=bm)
        tl.store(dg_t + 3 * M, d_o.to(out_ty), mask=bm)
        tl.store(ph_ptr + unit, ph_new, mask=bm)
        tl.store(gc_ptr + unit, gc_new, mask=bm)
    else:
        tl.store(dh0_ptr + unit, s_h, mask=bm)


@triton.jit(do_not_specialize=["B", "T", "P", "stride_do_t", "stride_do_b", "stride_do_u"])
def _lstm_bwd(
    dg_ptr, w_ptr, act_ptr, c_ptr, dout_ptr, stride_do_t, stride_do_b, stride_do_u,
    ph_ptr, gc_ptr, mask_ptr, dh0_ptr, sync_ptr, err_ptr,
    B, T, P,
    K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOUT: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The whole backward scan (time visited opposite to the forward), then dh_0."""
    pid = tl.program_id(0)
    G = 4 * M
    n_u = K * ((M + BLOCK_J - 1) // BLOCK_J)
    n_tiles = ((B + BLOCK_B - 1) // BLOCK_B) * n_u
    limit = tl.full([], _SPIN_LIMIT, tl.int32)
    for step in range(0, T):
        if REVERSE:
            t = step
            t_next = step - 1
            c_in = t + 2
        else:
            t = T - 1 - step
            t_next = t + 1
            c_in = t
        n_red = tl.where(step > 0, G, 0)       # no step processed before the first
        for tile in range(pid, n_tiles, P):
            _bwd_tile(tile // n_u, tile % n_u, dg_ptr, w_ptr, act_ptr, c_ptr, dout_ptr,
                      stride_do_t, stride_do_b, stride_do_u, ph_ptr, gc_ptr, mask_ptr, dh0_ptr,
                      t, t_next, n_red, c_in, t + 1, B, T, K, M, SHUFFLE, HAS_MASK, HAS_DOUT,
                      True, BLOCK_B, BLOCK_J, BLOCK_N, PRECISION)
        limit = _grid_sync(sync_ptr, err_ptr, (step + 1) * P, limit)
    if REVERSE:
        t_last = T - 1
    else:
        t_last = 0
    for tile in range(pid, n_tiles, P):
        _bwd_tile(tile // n_u, tile % n_u, dg_ptr, w_ptr, act_ptr, c_ptr, dout_ptr,
                  stride_do_t, stride_do_b, stride_do_u, ph_ptr, gc_ptr, mask_ptr, dh0_ptr,
                  0, t_last, G, 0, 0, B, T, K, M, SHUFFLE, HAS_MASK, HAS_DOUT,
                  False, BLOCK_B, BLOCK_J, BLOCK_N, PRECISION)


@triton.jit(do_not_specialize=["B"])
def _lstm_decode_step(
    x_ptr, wih_ptr, bih_ptr, whh_ptr, bhh_ptr, h_ptr, c_ptr, h_new_ptr, c_new_ptr, out_ptr,
    B,
    K: tl.constexpr, M: tl.constexpr, MI: tl.constexpr, SHUFFLE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One decoding step of one layer for a tile (batch tile, group k, m-units tile):
    gates = x_t[k] W_ih[k]^T + b_ih[k] + shuffle(h_{t-1})[k] W_hh[k]^T + b_hh[k], then the
    cell.  x: [B, K*MI]; W_ih: [K, 4M, MI]; W_hh: [K, 4M, M]; h, c (in and out): [K, B, M];
    out: [B, K*M] (the layer output, unit order)."""
    G = 4 * M
    k, offs_b, offs_j, mask_b, mask_j = _tile(tl.program_id(0), tl.program_id(1), B, M,
                                              BLOCK_B, BLOCK_J)
    offs_b64 = offs_b.to(tl.int64)
    ty = whh_ptr.dtype.element_ty

    acc_i = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    # input product: x[:, k*MI : (k+1)*MI] @ W_ih[k]^T
    wi_base = wih_ptr + k.to(tl.int64) * G * MI
    for r0 in range(0, MI, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < MI
        xv = tl.load(x_ptr + offs_b64[:, None] * (K * MI) + (k * MI + offs_r)[None, :],
                     mask=mask_b[:, None] & mask_r[None, :], other=0.0).to(ty)
        w_off = offs_j[None, :] * MI + offs_r[:, None]
        w_mask = mask_r[:, None] & mask_j[None, :]
        acc_i, acc_f, acc_g, acc_o = _add_gate_products(
            acc_i, acc_f, acc_g, acc_o, xv, wi_base + w_off, w_mask, M * MI, PRECISION)
    # recurrent product: shuffle(h)[k] @ W_hh[k]^T, h read in the state layout [K, B, M]
    wh_base = whh_ptr + k.to(tl.int64) * G * M
    for r0 in range(0, M, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < M
        src = _src_unit(k * M + offs_r, K, M, SHUFFLE)
        hp = tl.load(h_ptr + (src // M).to(tl.int64)[None, :] * B * M + offs_b64[:, None] * M
                     + (src % M)[None, :], mask=mask_b[:, None] & mask_r[None, :],
                     other=0.0).to(ty)
        w_off = offs_j[None, :] * M + offs_r[:, None]
        w_mask = mask_r[:, None] & mask_j[None, :]
        acc_i, acc_f, acc_g, acc_o = _add_gate_products(
            acc_i, acc_f, acc_g, acc_o, hp, wh_base + w_off, w_mask, M * M, PRECISION)

    bias = k * G + offs_j
    i = _sigmoid(acc_i + _bias_sum(bih_ptr, bhh_ptr, bias, mask_j)[None, :])
    f = _sigmoid(acc_f + _bias_sum(bih_ptr, bhh_ptr, bias + M, mask_j)[None, :])
    g = _tanh(acc_g + _bias_sum(bih_ptr, bhh_ptr, bias + 2 * M, mask_j)[None, :])
    o = _sigmoid(acc_o + _bias_sum(bih_ptr, bhh_ptr, bias + 3 * M, mask_j)[None, :])
    bm = mask_b[:, None] & mask_j[None, :]
    state = k.to(tl.int64) * B * M + offs_b64[:, None] * M + offs_j[None, :]
    c = f * tl.load(c_ptr + state, mask=bm, other=0.0).to(tl.float32) + i * g
    h = o * _tanh(c)
    st_ty = h_new_ptr.dtype.element_ty
    tl.store(c_new_ptr + state, c.to(st_ty), mask=bm)
    tl.store(h_new_ptr + state, h.to(st_ty), mask=bm)
    tl.store(out_ptr + offs_b64[:, None] * (K * M) + (k * M + offs_j)[None, :],
             h.to(out_ptr.dtype.element_ty), mask=bm)


# --------------------------------------------------------------------------- host side
def _cdiv(a, b):
    """ceil(a / b) in plain integers (triton.cdiv is a jit function: microseconds a call)."""
    return -(-a // b)


def _pow2(n, lo, hi):
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << max(int(n) - 1, 0).bit_length()))


# Tuning knobs, read once at import and checked at first use (an error raised at import
# would only make engine.triton_available() report Triton as missing):
# GRNN_TRITON_BLOCKS=bb,bj,br,warps forces the block sizes of every kernel;
# GRNN_TRITON_PROGRAMS=P caps the persistent grid.
_FORCED_BLOCKS = os.environ.get("GRNN_TRITON_BLOCKS")
_FORCED_PROGRAMS = os.environ.get("GRNN_TRITON_PROGRAMS")


@functools.lru_cache(maxsize=None)
def _parse_blocks(raw):
    try:
        vals = tuple(int(v) for v in raw.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4 or any(v < 16 or v & (v - 1) for v in vals[:3]) or \
            vals[3] not in (1, 2, 4, 8, 16):
        raise ValueError(f"GRNN_TRITON_BLOCKS={raw!r}: expected four integers bb,bj,br,warps "
                         "(block sizes powers of two >= 16, warps 1-16), e.g. 32,16,64,4")
    return vals


@functools.lru_cache(maxsize=None)
def _parse_programs(raw):
    try:
        p = int(raw)
    except ValueError:
        p = 0
    if p < 1:
        raise ValueError(f"GRNN_TRITON_PROGRAMS={raw!r}: expected a positive integer (the "
                         "most programs of a persistent kernel)")
    return p


@functools.lru_cache(maxsize=4096)
def _blocks(b, m, k, n_sm):
    """(BLOCK_B, BLOCK_J, BLOCK_R, num_warps) of the persistent scans.  Per time step the
    work is tiny and the time is latency, so the fastest grid spreads a step over the most
    SMs: tiles of 32 x 16 while their count fits one per SM, else 32 x 32 (measured on an
    H100, bf16, T=50, B=64, H=1024: 32 x 16 beat 32 x 32 by 1.4x in training;
    results/gpu_h100/README.md).  At most four variants per layer shape (BLOCK_B 16 for batches
    of 16 or less), so fairseq's changing batch sizes compile only a few kernels."""
    if _FORCED_BLOCKS:
        return _parse_blocks(_FORCED_BLOCKS)
    bb = _pow2(min(b, 32), 16, 32)
    bj = 16 if _cdiv(b, bb) * k * _cdiv(m, 16) <= n_sm else _pow2(m, 16, 32)
    return bb, bj, _pow2(m, 16, 64), 4


@functools.lru_cache(maxsize=4096)
def _decode_blocks(b, m, mi):
    """Block sizes of the decoding step (an ordinary grid: one program per tile)."""
    if _FORCED_BLOCKS:
        return _parse_blocks(_FORCED_BLOCKS)
    return _pow2(b, 16, 32), _pow2(m, 16, 32), _pow2(min(m, mi), 16, 128), 4


def _precision(dtype):
    """tl.dot's input precision: only fp32 operands have a choice (TF32 iff torch allows it)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


_SM_COUNT = {}
_HEALTH = {}          # device -> sticky int32 flag, set by a barrier that gave up
_LAUNCHES = [0]
_CHECK_EVERY = 64


def _sm_count(device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _grid(b, m, k, device):
    """Block sizes and P, the persistent grid: every program must be resident at once (one
    per SM at most, fewer with GRNN_TRITON_PROGRAMS); the interpreter runs programs one
    by one, so there P = 1."""
    n_sm = 1 << 30 if _interpreting() else _sm_count(device)
    bb, bj, br, nw = _blocks(b, m, k, n_sm)
    n_tiles = _cdiv(b, bb) * k * _cdiv(m, bj)
    if _interpreting():
        p = 1
    elif _FORCED_PROGRAMS:
        p = max(1, min(n_tiles, _parse_programs(_FORCED_PROGRAMS)))
    else:
        p = max(1, min(n_tiles, n_sm))
    return bb, bj, br, nw, p


def _sync_buffers(device):
    """A fresh barrier counter for one launch, and the device's sticky error flag."""
    if device not in _HEALTH:
        _HEALTH[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return torch.zeros(1, dtype=torch.int32, device=device), _HEALTH[device]


def _check_health(device):
    """Raise if a barrier gave up.  Checked at the first launch and then every
    ``_CHECK_EVERY`` launches (a check waits for the GPU); the flag is sticky, so a failure
    is never missed, only reported up to that many launches late."""
    _LAUNCHES[0] += 1
    if _LAUNCHES[0] % _CHECK_EVERY == 1 and int(_HEALTH[device].item()):
        raise RuntimeError(
            "grnn_fairseq Triton LSTM: the programs of a persistent kernel were not all "
            "resident on the GPU at once (another process or stream holds SMs), so a "
            "time-step barrier gave up and results since the last check are invalid. "
            "Set GRNN_TRITON_PROGRAMS to a smaller number of programs, or use "
            "GRNN_BACKEND=torch.")


def _flat(x):
    """[K, B, m] -> a fresh contiguous fp32 [B, K*m] buffer (kernels write into it: never a
    view, e.g. of an expanded gradient)."""
    k, b, m = x.shape
    out = torch.empty(b, k * m, dtype=torch.float32, device=x.device)
    out.view(b, k, m).copy_(x.transpose(0, 1))
    return out


def _grouped(x, k, dtype):
    """[B, H] -> [K, B, m] contiguous in ``dtype``."""
    b, h = x.shape
    return x.view(b, k, h // k).transpose(0, 1).to(dtype).contiguous()


def _forward(gx, h0, c0, weight_hh, bias_hh, mask, time_shuffle, reverse, save):
    t_len, k, b, gm = gx.shape
    m = gm // 4
    width = k * m
    if gx.stride(-1) != 1:
        gx = gx.contiguous()
    w = weight_hh.contiguous()
    bias = bias_hh.contiguous()
    n_slots = t_len + 2 if save else 2
    hs = gx.new_empty(n_slots, b, width, dtype=torch.float32)
    cs = gx.new_empty(n_slots, b, width, dtype=torch.float32)
    if save:
        first, last = (t_len + 1, 1) if reverse else (0, t_len)
    else:
        first, last = 0, t_len % 2
    hs[first] = _flat(h0)
    cs[first] = _flat(c0)
    out = gx.new_empty(t_len, b, width)
    acts = gx.new_empty(k, t_len, b, gm, dtype=torch.float32) if save else out
    mask8 = mask.to(torch.int8).contiguous() if mask is not None else out
    bb, bj, br, nw, n_prog = _grid(b, m, k, gx.device)
    sync, err = _sync_buffers(gx.device)
    _lstm_fwd[(n_prog,)](
        gx, gx.stride(0), gx.stride(1), gx.stride(2),
        w, bias, hs, cs, out, acts, mask8, sync, err, b, t_len, n_prog,
        K=k, M=m, SHUFFLE=bool(time_shuffle), HAS_MASK=mask is not None, SAVE=save,
        REVERSE=bool(reverse), BLOCK_B=bb, BLOCK_J=bj, BLOCK_R=br,
        PRECISION=_precision(w.dtype), num_warps=nw,
    )
    _check_health(gx.device)
    h_t = _grouped(hs[last], k, gx.dtype)
    c_t = _grouped(cs[last], k, gx.dtype)
    return out, h_t, c_t, ((acts, hs, cs) if save else None)


def _backward(ctx, d_out, d_h, d_c):
    acts, hs, cs = ctx.buffers
    w, = ctx.saved_tensors
    k, t_len, b, gm = acts.shape
    m = gm // 4
    width = k * m
    dtype, mask, time_shuffle, reverse = ctx.dtype, ctx.mask, ctx.time_shuffle, ctx.reverse
    dg = acts.new_empty(k, t_len, b, gm, dtype=dtype)
    ph = _flat(d_h) if d_h is not None else acts.new_zeros(b, width)
    gc = _flat(d_c) if d_c is not None else acts.new_zeros(b, width)
    dh0 = acts.new_empty(b, width)
    mask8 = mask.to(torch.int8).contiguous() if mask is not None else ph
    has_dout = d_out is not None
    if not has_dout:
        d_out = ph
        strides = (0, 0, 0)
    else:
        strides = d_out.stride()
    bb, bj, _, nw, n_prog = _grid(b, m, k, acts.device)
    bn = _pow2(gm, 16, 64)
    sync, err = _sync_buffers(acts.device)
    _lstm_bwd[(n_prog,)](
        dg, w, acts, cs, d_out, *strides, ph, gc, mask8, dh0, sync, err, b, t_len, n_prog,
        K=k, M=m, SHUFFLE=bool(time_shuffle), HAS_MASK=mask is not None, HAS_DOUT=has_dout,
        REVERSE=bool(reverse), BLOCK_B=bb, BLOCK_J=bj, BLOCK_N=bn,
        PRECISION=_precision(w.dtype), num_warps=nw)
    _check_health(acts.device)
    # dW_hh[k] = sum_t dG_t[k]^T h_in_t[k]: h_in_t = the state slot before t, shuffled
    h_in = hs[2:] if reverse else hs[:t_len]                      # [T, B, H] unit order
    if time_shuffle:
        h_in = h_in.view(t_len, b, k, m).transpose(2, 3)           # rearrange(): j*K + k
    h_in = h_in.reshape(t_len * b, k, m).transpose(0, 1).to(dtype)  # [K, T*B, m]
    d_w = torch.bmm(dg.view(k, t_len * b, gm).transpose(1, 2), h_in)
    d_b = dg.sum((1, 2), dtype=torch.float32).to(dtype)
    return (dg.transpose(0, 1), _grouped(dh0, k, dtype), _grouped(gc, k, dtype),
            d_w.to(w.dtype), d_b)


class _TritonLSTMScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, h0, c0, weight_hh, bias_hh, mask, time_shuffle, reverse):
        out, h_t, c_t, saved = _forward(gx, h0, c0, weight_hh, bias_hh, mask, time_shuffle,
                                        reverse, save=True)
        ctx.buffers = saved
        ctx.save_for_backward(weight_hh.contiguous())
        ctx.dtype, ctx.mask = gx.dtype, mask
        ctx.time_shuffle, ctx.reverse = time_shuffle, reverse
        return out, h_t, c_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_h, d_c):
        return _backward(ctx, d_out, d_h, d_c) + (None, None, None)


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lstm_scan_triton(gx, h0, c0, weight_hh, bias_hh, mask=None, time_shuffle=False,
                     reverse=False):
    """``engine.scan`` for the LSTM with the Triton kernels.

    gx: [T, K, B, 4m]; h0, c0: [K, B, m]; weight_hh: [K, 4m, m]; bias_hh: [K, 4m];
    mask: [T, B] bool (True at tokens) or None.  -> (out [T, K, B, m], h_T, c_T).
    """
    if gx.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton LSTM supports {SUPPORTED_DTYPES}, got {gx.dtype}")
    t_len, k, b, gm = gx.shape
    if t_len == 0:
        return gx.new_zeros(0, k, b, gm // 4), h0, c0
    need_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (gx, h0, c0, weight_hh, bias_hh))
    if need_grad:
        out, h_t, c_t = _TritonLSTMScan.apply(gx, h0, c0, weight_hh, bias_hh, mask,
                                              time_shuffle, reverse)
    else:
        with torch.no_grad():
            out, h_t, c_t, _ = _forward(gx, h0, c0, weight_hh, bias_hh, mask, time_shuffle,
                                        reverse, save=False)
    return out.view(t_len, b, k, -1).transpose(1, 2), h_t, c_t


def lstm_step_triton(x, h, c, weight_ih, bias_ih, weight_hh, bias_hh, time_shuffle=False):
    """One decoding step of one layer, fused into one launch (no autograd).

    x: [B, I]; h, c: [K, B, m]; weight_ih: [K, 4m, I/K]; bias_ih: [K, 4m];
    weight_hh: [K, 4m, m]; bias_hh: [K, 4m]  ->  (out [B, K*m], h_t, c_t [K, B, m]).
    Operands in the weights' dtype; the gates are computed in fp32.
    """
    k, gm, mi = weight_ih.shape
    m = gm // 4
    b = x.shape[0]
    ty = weight_hh.dtype
    if ty not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton LSTM supports {SUPPORTED_DTYPES}, got {ty}")
    x = x.to(ty).contiguous()
    h, c = h.contiguous(), c.contiguous()
    h_new, c_new = torch.empty_like(h), torch.empty_like(c)
    out = x.new_empty(b, k * m)
    bb, bj, br, nw = _decode_blocks(b, m, mi)
    grid = (_cdiv(b, bb), k * _cdiv(m, bj))
    _lstm_decode_step[grid](
        x, weight_ih.contiguous(), bias_ih.contiguous(), weight_hh.contiguous(),
        bias_hh.contiguous(), h, c, h_new, c_new, out, b,
        K=k, M=m, MI=mi, SHUFFLE=bool(time_shuffle), BLOCK_B=bb, BLOCK_J=bj, BLOCK_R=br,
        PRECISION=_precision(ty), num_warps=nw)
    return out, h_new, c_new


def compile_check(arch=90, dtypes=("bf16", "fp32"), m=256, k=4):
    """Compile the kernels ahead of time for a CUDA target (no GPU needed: Triton's bundled
    ptxas), every feature on (shuffle, mask, training, output gradient, reverse).  Catches
    type, shape and lowering errors that the interpreter does not.  Returns the number
    compiled.  Run it without TRITON_INTERPRET (the interpreter replaces the kernels)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    n = 0
    for dt in dtypes:
        prec = "tf32" if dt == "fp32" else None
        for fn, ptrs, consts in (
            (_lstm_fwd,
             dict(gx_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", h_ptr="*fp32", c_ptr="*fp32",
                  out_ptr=f"*{dt}", act_ptr="*fp32", mask_ptr="*i8", sync_ptr="*i32",
                  err_ptr="*i32"),
             dict(K=k, M=m, SHUFFLE=True, HAS_MASK=True, SAVE=True, REVERSE=True, BLOCK_B=32,
                  BLOCK_J=32, BLOCK_R=64, PRECISION=prec)),
            (_lstm_bwd,
             dict(dg_ptr=f"*{dt}", w_ptr=f"*{dt}", act_ptr="*fp32", c_ptr="*fp32",
                  dout_ptr=f"*{dt}", ph_ptr="*fp32", gc_ptr="*fp32", mask_ptr="*i8",
                  dh0_ptr="*fp32", sync_ptr="*i32", err_ptr="*i32"),
             dict(K=k, M=m, SHUFFLE=True, HAS_MASK=True, HAS_DOUT=True, REVERSE=True,
                  BLOCK_B=32, BLOCK_J=32, BLOCK_N=64, PRECISION=prec)),
            (_lstm_decode_step,
             dict(x_ptr=f"*{dt}", wih_ptr=f"*{dt}", bih_ptr=f"*{dt}", whh_ptr=f"*{dt}",
                  bhh_ptr=f"*{dt}", h_ptr=f"*{dt}", c_ptr=f"*{dt}", h_new_ptr=f"*{dt}",
                  c_new_ptr=f"*{dt}", out_ptr=f"*{dt}"),
             dict(K=k, M=m, MI=m, SHUFFLE=True, BLOCK_B=32, BLOCK_J=32, BLOCK_R=64,
                  PRECISION=prec)),
        ):
            sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}
            triton.compile(ASTSource(fn, sig, consts), target=target, options=dict(num_warps=4))
            n += 1
    return n
