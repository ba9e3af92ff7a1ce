"""Group LSTM, GRU and Elman RNN recurrences in Triton: persistent forward and backward
kernels, and fused decoding steps.

Design
------
**One launch per sequence** (forward; the backward adds one launch for dh_0).  A fixed
grid of P programs (P <= the number of SMs, so that all are resident at once) loops over
the time steps inside the kernel; each program owns the same tiles at every step.  With
the time-step shuffle every group reads h_{t-1} of *every* group, so programs meet at a
grid-wide barrier between steps (:func:`_grid_sync`: an atomic counter in global memory,
release on arrival, acquire while waiting; state loads bypass L1).  A barrier that waits
far too long (programs not co-resident, e.g. SMs taken by another process) gives up and
raises a flag; the host turns it into an error instead of returning wrong numbers.  The
persistent drivers (:func:`_scan_fwd`, :func:`_scan_bwd`) are shared by the cells; a
constexpr ``CELL`` picks the tile functions.  ``VARIANT`` selects A/B variants of the scans
for timing on a GPU (how the barrier polls; the LSTM forward's resident W_hh slices; W_hh's
columns permuted so that the shuffled reads are contiguous runs).

* forward tile (:func:`_fwd_tile`; the cells in ``_lstm_fwd_cell``, ``_gru_fwd_cell``,
  ``_rnn_fwd_cell``), tile = (batch tile, group k, tile of m units): the recurrent product
  of those units' gate rows with h_{t-1} **read through the shuffle index**
  (``src = (q % K) * m + q // K`` computed in the kernel; no permuted copy of h is ever
  made), + the input projection gx[t] and b_hh, the cell, the padding mask (padded steps
  keep the state and output zeros), and the stores: output h_t, states and, for training,
  the activations (LSTM i, f, g, o; GRU r, z, n and W_hn h' + b_hn; the RNN none: its
  backward reads h_t).
* backward tile (:func:`_bwd_tile`; the cells in ``_lstm_bwd_cell``, ``_gru_bwd_cell``,
  ``_rnn_bwd_cell``), tile = (batch tile, group k, tile of m operand positions q): the
  product dG_{t+1}[k] W_hh[k] for those positions (the gradient of the shuffled operand,
  :func:`_operand_grad`), mapped back to the units that fed them (``u = src(q)``), then
  the cell's backward at time t for exactly those units: gate gradients, and the
  gradients carried to step t-1 per unit (LSTM: dc; GRU: z dh, the interpolation term;
  all: the pass-through of padded steps).  Each unit is owned by one tile, so the
  in-place updates of the carried gradients are race free.  After the last step a pass
  with ``DO_CELL=False`` turns dG_0 W_hh into dh_0.
* decoding (:func:`_decode_step`; the cells in ``_lstm_step_cell``, ``_gru_step_cell``,
  ``_rnn_step_cell``): one launch per layer and step computes x_t W_ih^T + b_ih and
  shuffle(h_{t-1}) W_hh^T + b_hh, the cell, and writes h_t in both the state layout
  [K, B, m] and the output layout [B, H].
* training steps (:class:`_TritonStep`, where VARIANT['train_step'] is on): a step with
  autograd (a decoder trained step by step) is the decoding step saving its activations
  and shuffled operand, and its backward one launch for the cell (:func:`_step_bwd`)
  plus the products with the weights in cuBLAS; the weight gradients of a sequence of
  steps as one product per weight after its last step
  (:class:`~grnn_fairseq.sequence_weights.SequenceWeights`).

The large products without a sequential dependency stay in cuBLAS: the input projection
(``engine.project_input``) and dW_hh = sum_t dG_t^T h_in_t (one batched product after the
loop; h_in_t = the states gathered in shuffled order).

States and carried gradients are fp32 buffers whatever the input dtype; products take
their operands in the weights' dtype (bf16/fp16 tensor cores, or fp32 with TF32 exactly
when ``torch.backends.cuda.matmul.allow_tf32`` allows it) and accumulate in fp32.

Recompilation: T, B, P and the step counters are runtime arguments excluded from
Triton's integer specialisation, so neither the batch size nor the sequence length
recompiles; the block sizes come from a few buckets of (B, m).  Variants are compiled per
(cell, dtype, m, K, shuffle, mask, training) only.

Under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tests) programs run one after the
other, so a barrier between them could never be met: there the grid is one program that
walks every tile (the same code, the barrier trivially passed).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from ..cells import GATES
from ..engine import _interpreting
from ..errors import ConfigError, switch
from ..sequence_weights import hand_over

# spins of a barrier before it gives up (each spin is one atomic read of L2, ~1 us):
# far beyond any real step (microseconds), short enough that a broken launch ends in ~1 s
_SPIN_LIMIT = tl.constexpr(1 << 20)
CELLS = tuple(GATES)                     # every cell of cells.py has kernels here
ACTS = {"lstm": 4, "gru": 4, "rnn": 0}  # activations saved per unit for the backward


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _grid_sync(sync_ptr, err_ptr, target, limit, POLL: tl.constexpr):
    """Grid-wide barrier number n: ``target`` = n * P.  The counter only grows, so no reset
    is needed between barriers.  Waits at most ``limit`` spins; a wait that gives up sets
    the sticky flag err_ptr and returns limit 0, so that the launch's later barriers do
    not wait again (the launch is then finished quickly, and reported by the host).

    POLL picks how a waiting program reads the counter: "atomic" (an acquire read-modify-
    write per spin, so waiting programs queue at the counter with the arriving ones) or
    "load" (volatile loads while waiting, then one acquire read-modify-write, which reads a
    value >= target and so synchronises with every program's release)."""
    tl.debug_barrier()                                   # this program's stores are issued
    tl.atomic_add(sync_ptr, 1, sem="release")
    spins = tl.full([], 0, tl.int32)
    if POLL == "load":
        seen = tl.load(sync_ptr, volatile=True)
        while (seen < target) & (spins < limit):
            seen = tl.load(sync_ptr, volatile=True)
            spins += 1
    seen = tl.atomic_add(sync_ptr, 0, sem="acquire")
    while (seen < target) & (spins < limit):
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire")
        spins += 1
    if seen < target:
        tl.atomic_max(err_ptr, 1)
        limit = limit * 0
    tl.debug_barrier()
    return limit


@triton.jit
def _add_products3(acc_a, acc_b, acc_c, a, w_ptrs, w_mask, gate_stride,
                   PRECISION: tl.constexpr):
    """acc_gate += a @ W_gate for three gates: ``w_ptrs`` points at the first gate's [R, J]
    weight tile, each next gate ``gate_stride`` elements further."""
    acc_a += tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), input_precision=PRECISION)
    acc_b += tl.dot(a, tl.load(w_ptrs + gate_stride, mask=w_mask, other=0.0),
                    input_precision=PRECISION)
    acc_c += tl.dot(a, tl.load(w_ptrs + 2 * gate_stride, mask=w_mask, other=0.0),
                    input_precision=PRECISION)
    return acc_a, acc_b, acc_c


@triton.jit
def _add_gate_products(acc_i, acc_f, acc_g, acc_o, a, w_ptrs, w_mask, gate_stride,
                       PRECISION: tl.constexpr):
    """The same for the LSTM's four gates (i, f, g, o)."""
    acc_i, acc_f, acc_g = _add_products3(acc_i, acc_f, acc_g, a, w_ptrs, w_mask, gate_stride,
                                         PRECISION)
    acc_o += tl.dot(a, tl.load(w_ptrs + 3 * gate_stride, mask=w_mask, other=0.0),
                    input_precision=PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _bias_sum(b1_ptr, b2_ptr, offs, mask):
    """b1[offs] + b2[offs] in fp32."""
    return (tl.load(b1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            + tl.load(b2_ptr + offs, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _gate_input(gx_base, b_base, off, bm, mask_j):
    """gx[t] + b_hh of one gate (at offset ``off`` along the gates) of a tile, in fp32."""
    return (tl.load(gx_base + off, mask=bm, other=0.0).to(tl.float32)
            + tl.load(b_base + off, mask=mask_j, other=0.0).to(tl.float32)[None, :])


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
def _src_unit(k, q, K: tl.constexpr, M: tl.constexpr, SHUFFLE: tl.constexpr):
    """The unit read at operand position q of group k (a column of the W_hh[k] the kernel
    gets).  SHUFFLE 0: none, unit k*M + q; 1: the time-step shuffle (rearrange()), unit
    src(Q) = (Q % K) * M + Q // K of Q = k*M + q; 2: the shuffle with W_hh's columns
    permuted on the host (:func:`_shuffle_order`), so that group k reads M/K contiguous
    units of every group: unit (q // C) * M + k * C + q % C with C = M/K."""
    if SHUFFLE == 2:
        C: tl.constexpr = M // K
        return (q // C) * M + k * C + q % C
    elif SHUFFLE:
        Q = k * M + q
        return (Q % K) * M + Q // K
    else:
        return k * M + q


@triton.jit
def _operand(h_base, row_b, mask_b, k, r0, offs_j, mask_j, ty,
             K: tl.constexpr, M: tl.constexpr, SHUFFLE: tl.constexpr, BLOCK_R: tl.constexpr):
    """Operand positions [r0, r0 + BLOCK_R) of group k: shuffle(h_{t-1}) read from the
    unit-order state rows (in ``ty``), and the offsets and mask of the matching [R, J]
    weight tile (W_hh[k, gate*M + j, r] as [r, j])."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < M
    src = _src_unit(k, offs_r, K, M, SHUFFLE)
    hp = tl.load(h_base + row_b[:, None] + src[None, :],
                 mask=mask_b[:, None] & mask_r[None, :], other=0.0, cache_modifier=".cg")
    return hp.to(ty), offs_j[None, :] * M + offs_r[:, None], mask_r[:, None] & mask_j[None, :]


@triton.jit
def _gates(CELL: tl.constexpr):
    """Gate rows per unit: LSTM 4, GRU 3, Elman RNN 1 (a constexpr)."""
    if CELL == "gru":
        return 3
    elif CELL == "rnn":
        return 1
    else:
        return 4


@triton.jit
def _keep(mask_ptr, t, offs_b, mask_b, B):
    """The padding mask of step t for a batch tile: [BLOCK_B, 1], true at tokens."""
    return (tl.load(mask_ptr + t * B + offs_b, mask=mask_b, other=0) != 0)[:, None]


@triton.jit
def _store_acts(act_ptr, k, t, offs_b, offs_j, bm, a0, a1, a2, a3, B, T, M: tl.constexpr):
    """The four activations of a tile at step t into act [K, T, B, 4M]."""
    base = (act_ptr + ((k.to(tl.int64) * T + t) * B + offs_b.to(tl.int64))[:, None] * (4 * M)
            + offs_j[None, :])
    tl.store(base, a0, mask=bm)
    tl.store(base + M, a1, mask=bm)
    tl.store(base + 2 * M, a2, mask=bm)
    tl.store(base + 3 * M, a3, mask=bm)


# ----------------------------------------------------------------------- forward tiles
@triton.jit
def _lstm_fwd_cell(w_base, h_base, row_b, offs_b, mask_b, k, offs_j, mask_j, gx_base, b_base,
                   bm, unit, keep, c_ptr, act_ptr, t, s_in, s_out, B, T, w_i, w_f, w_g, w_o,
                   K: tl.constexpr, M: tl.constexpr, SHUFFLE: tl.constexpr,
                   HAS_MASK: tl.constexpr, SAVE: tl.constexpr, RESIDENT: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr):
    """The LSTM at step t for a tile's units (Hochreiter & Schmidhuber; PyTorch's gates i, f,
    g, o): c_t = f c_{t-1} + i g, h_t = o tanh(c_t), the gates reading shuffle(h_{t-1}).
    Stores c_t (kept at padding) and the activations; -> (h_t, h_{t-1}; the latter read
    only with a mask).  RESIDENT: the tile's W_hh slices are w_i, w_f, w_g, w_o ([M, J],
    loaded once per scan; BLOCK_R = M), else they are loaded from w_base at every step."""
    H = K * M
    if RESIDENT:
        hp, _, _ = _operand(h_base, row_b, mask_b, k, 0, offs_j, mask_j, w_i.dtype, K, M,
                            SHUFFLE, BLOCK_R)
        acc_i = tl.dot(hp, w_i, input_precision=PRECISION)
        acc_f = tl.dot(hp, w_f, input_precision=PRECISION)
        acc_g = tl.dot(hp, w_g, input_precision=PRECISION)
        acc_o = tl.dot(hp, w_o, input_precision=PRECISION)
    else:
        acc_i = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
        acc_f = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
        acc_o = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
        for r0 in range(0, M, BLOCK_R):
            hp, w_off, w_mask = _operand(h_base, row_b, mask_b, k, r0, offs_j, mask_j,
                                         w_base.dtype.element_ty, K, M, SHUFFLE, BLOCK_R)
            acc_i, acc_f, acc_g, acc_o = _add_gate_products(
                acc_i, acc_f, acc_g, acc_o, hp, w_base + w_off, w_mask, M * M, PRECISION)
    i = _sigmoid(acc_i + _gate_input(gx_base, b_base, 0, bm, mask_j))
    f = _sigmoid(acc_f + _gate_input(gx_base, b_base, M, bm, mask_j))
    g = _tanh(acc_g + _gate_input(gx_base, b_base, 2 * M, bm, mask_j))
    o = _sigmoid(acc_o + _gate_input(gx_base, b_base, 3 * M, bm, mask_j))
    c_prev = tl.load(c_ptr + s_in.to(tl.int64) * B * H + unit, mask=bm, other=0.0,
                     cache_modifier=".cg")
    c_new = f * c_prev + i * g
    h_new = o * _tanh(c_new)
    if HAS_MASK:
        h_prev = tl.load(h_base + unit, mask=bm, other=0.0, cache_modifier=".cg")
        c_state = tl.where(keep, c_new, c_prev)
    else:
        h_prev = h_new
        c_state = c_new
    tl.store(c_ptr + s_out.to(tl.int64) * B * H + unit, c_state, mask=bm)
    if SAVE:
        _store_acts(act_ptr, k, t, offs_b, offs_j, bm, i, f, g, o, B, T, M)
    return h_new, h_prev


@triton.jit
def _gru_fwd_cell(w_base, h_base, row_b, offs_b, mask_b, k, offs_j, mask_j, gx_base, b_base,
                  bm, unit, act_ptr, t, T, B,
                  K: tl.constexpr, M: tl.constexpr, SHUFFLE: tl.constexpr,
                  SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                  BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """The GRU at step t for a tile's units (Cho et al. 2014 in PyTorch's form, gates r, z,
    n): r = s(x_r + W_hr h' + b_hr), z = s(x_z + W_hz h' + b_hz), n = tanh(x_n + r (W_hn h'
    + b_hn)), h_t = n + z (h_{t-1} - n); h' = shuffle(h_{t-1}) is what the weights read, the
    interpolation keeps each unit's own h_{t-1}.  Stores the activations r, z, n,
    W_hn h' + b_hn; -> (h_t, h_{t-1})."""
    acc_r = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, M, BLOCK_R):
        hp, w_off, w_mask = _operand(h_base, row_b, mask_b, k, r0, offs_j, mask_j,
                                     w_base.dtype.element_ty, K, M, SHUFFLE, BLOCK_R)
        acc_r, acc_z, acc_n = _add_products3(acc_r, acc_z, acc_n, hp, w_base + w_off, w_mask,
                                             M * M, PRECISION)
    r = _sigmoid(acc_r + _gate_input(gx_base, b_base, 0, bm, mask_j))
    z = _sigmoid(acc_z + _gate_input(gx_base, b_base, M, bm, mask_j))
    hn = acc_n + tl.load(b_base + 2 * M, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    n = _tanh(tl.load(gx_base + 2 * M, mask=bm, other=0.0).to(tl.float32) + r * hn)
    h_prev = tl.load(h_base + unit, mask=bm, other=0.0, cache_modifier=".cg")
    h_new = n + z * (h_prev - n)
    if SAVE:
        _store_acts(act_ptr, k, t, offs_b, offs_j, bm, r, z, n, hn, B, T, M)
    return h_new, h_prev


@triton.jit
def _rnn_fwd_cell(w_base, h_base, row_b, mask_b, k, offs_j, mask_j, gx_base, b_base, bm, unit,
                  K: tl.constexpr, M: tl.constexpr, SHUFFLE: tl.constexpr,
                  HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                  BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """The Elman RNN at step t for a tile's units: h_t = tanh(x W_ih^T + b_ih + h' W_hh^T +
    b_hh), h' = shuffle(h_{t-1}).  Nothing to save: the backward reads h_t from its slot.
    -> (h_t, h_{t-1}; the latter read only with a mask)."""
    acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, M, BLOCK_R):
        hp, w_off, w_mask = _operand(h_base, row_b, mask_b, k, r0, offs_j, mask_j,
                                     w_base.dtype.element_ty, K, M, SHUFFLE, BLOCK_R)
        acc += tl.dot(hp, tl.load(w_base + w_off, mask=w_mask, other=0.0),
                      input_precision=PRECISION)
    h_new = _tanh(acc + _gate_input(gx_base, b_base, 0, bm, mask_j))
    if HAS_MASK:
        h_prev = tl.load(h_base + unit, mask=bm, other=0.0, cache_modifier=".cg")
    else:
        h_prev = h_new
    return h_new, h_prev


@triton.jit
def _fwd_tile(
    CELL: tl.constexpr, pid_b, pid_u, gx_ptr, stride_gx_t, stride_gx_k, stride_gx_b,
    w_ptr, b_ptr, h_ptr, c_ptr, out_ptr, act_ptr, mask_ptr,
    t, s_in, s_out, B, T, w_res,
    K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """One forward step t for one tile (batch tile, group k, tile of m units): the cell,
    then h_t stored as the state (slot s_out) and as the output of step t; a padded row
    keeps h_{t-1} and outputs zeros.  w_res: the tile's resident W_hh slices (RESIDENT,
    LSTM only), else unused."""
    H = K * M
    G = _gates(CELL) * M
    k, offs_b, offs_j, mask_b, mask_j = _tile(pid_b, pid_u, B, M, BLOCK_B, BLOCK_J)
    row_b = offs_b.to(tl.int64) * H
    w_base = w_ptr + k.to(tl.int64) * G * M
    h_base = h_ptr + s_in.to(tl.int64) * B * H
    bm = mask_b[:, None] & mask_j[None, :]
    gx_base = (gx_ptr + t.to(tl.int64) * stride_gx_t + k.to(tl.int64) * stride_gx_k
               + offs_b.to(tl.int64)[:, None] * stride_gx_b + offs_j[None, :])
    b_base = b_ptr + k * G + offs_j
    unit = row_b[:, None] + (k * M + offs_j)[None, :]        # [B, H] offsets, unit order
    if HAS_MASK:
        keep = _keep(mask_ptr, t, offs_b, mask_b, B)
    else:
        keep = True
    if CELL == "gru":
        h_new, h_prev = _gru_fwd_cell(w_base, h_base, row_b, offs_b, mask_b, k, offs_j,
                                      mask_j, gx_base, b_base, bm, unit, act_ptr, t, T, B,
                                      K, M, SHUFFLE, SAVE, BLOCK_B, BLOCK_J, BLOCK_R,
                                      PRECISION)
    elif CELL == "rnn":
        h_new, h_prev = _rnn_fwd_cell(w_base, h_base, row_b, mask_b, k, offs_j, mask_j,
                                      gx_base, b_base, bm, unit, K, M, SHUFFLE, HAS_MASK,
                                      BLOCK_B, BLOCK_J, BLOCK_R, PRECISION)
    else:
        h_new, h_prev = _lstm_fwd_cell(w_base, h_base, row_b, offs_b, mask_b, k, offs_j,
                                       mask_j, gx_base, b_base, bm, unit, keep, c_ptr, act_ptr,
                                       t, s_in, s_out, B, T, w_res[0], w_res[1], w_res[2],
                                       w_res[3], K, M, SHUFFLE, HAS_MASK, SAVE, RESIDENT,
                                       BLOCK_B, BLOCK_J, BLOCK_R, PRECISION)
    if HAS_MASK:
        h_state = tl.where(keep, h_new, h_prev)
        h_emit = tl.where(keep, h_new, 0.0)
    else:
        h_state = h_new
        h_emit = h_new
    tl.store(h_ptr + s_out.to(tl.int64) * B * H + unit, h_state, mask=bm)
    tl.store(out_ptr + t.to(tl.int64) * B * H + unit,
             h_emit.to(out_ptr.dtype.element_ty), mask=bm)


@triton.jit
def _fwd_slots(step, T, SAVE: tl.constexpr, REVERSE: tl.constexpr):
    """Forward step number ``step`` -> (t, slot of h_{t-1}, slot of h_t).  With SAVE every
    time has its slot (t + 1 after step t; the initial state in 0, or T + 1 reversed: the
    backward reads them all), else two slots used in turn."""
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
    return t, s_in, s_out


@triton.jit
def _resident_weights(w_ptr, pid, B, K: tl.constexpr, M: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    """The four [M, J] W_hh slices (i, f, g, o) of the LSTM tile ``pid`` (one tile per
    program), as the forward's products read them."""
    n_u = K * ((M + BLOCK_J - 1) // BLOCK_J)
    k, _, offs_j, _, mask_j = _tile(pid // n_u, pid % n_u, B, M, BLOCK_B, BLOCK_J)
    offs_r = tl.arange(0, M)
    ptrs = w_ptr + k.to(tl.int64) * 4 * M * M + offs_j[None, :] * M + offs_r[:, None]
    mask = mask_j[None, :] & (offs_r < M)[:, None]
    return (tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + M * M, mask=mask, other=0.0),
            tl.load(ptrs + 2 * M * M, mask=mask, other=0.0),
            tl.load(ptrs + 3 * M * M, mask=mask, other=0.0))


@triton.jit(do_not_specialize=["B", "T", "P", "stride_gx_t", "stride_gx_k", "stride_gx_b"])
def _scan_fwd(
    gx_ptr, stride_gx_t, stride_gx_k, stride_gx_b,
    w_ptr, b_ptr, h_ptr, c_ptr, out_ptr, act_ptr, mask_ptr, sync_ptr, err_ptr,
    B, T, P,
    CELL: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, POLL: tl.constexpr, RESIDENT: tl.constexpr,
):
    """The whole forward scan of a cell ('lstm': c_ptr holds the c slots; 'gru': unused):
    P programs, a barrier between time steps (none after the last: nothing reads across
    tiles after it).  RESIDENT (LSTM; the host launches one program per tile and BLOCK_R =
    M): each program loads its tile's W_hh slices once, before the time loop."""
    pid = tl.program_id(0)
    n_u = K * ((M + BLOCK_J - 1) // BLOCK_J)
    n_tiles = ((B + BLOCK_B - 1) // BLOCK_B) * n_u
    limit = tl.full([], _SPIN_LIMIT, tl.int32)
    if RESIDENT:
        w_res = _resident_weights(w_ptr, pid, B, K, M, BLOCK_B, BLOCK_J)
    else:
        w_res = (w_ptr, w_ptr, w_ptr, w_ptr)
    for step in range(0, T):
        t, s_in, s_out = _fwd_slots(step, T, SAVE, REVERSE)
        for tile in range(pid, n_tiles, P):
            _fwd_tile(CELL, tile // n_u, tile % n_u, gx_ptr, stride_gx_t, stride_gx_k,
                      stride_gx_b, w_ptr, b_ptr, h_ptr, c_ptr, out_ptr, act_ptr, mask_ptr,
                      t, s_in, s_out, B, T, w_res, K, M, SHUFFLE, HAS_MASK, SAVE, RESIDENT,
                      BLOCK_B, BLOCK_J, BLOCK_R, PRECISION)
        if step + 1 < T:
            limit = _grid_sync(sync_ptr, err_ptr, (step + 1) * P, limit, POLL)


# ---------------------------------------------------------------------- backward tiles
@triton.jit
def _operand_grad(dg_ptr, w_ptr, k, t_next, n_red, offs_b64, mask_b, offs_j, mask_j, B, T,
                  G: tl.constexpr, M: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dG_{t_next}[k] @ W_hh[k] at operand positions offs_j of group k: the gradient of the
    operand h_in[k, :, j] of the step processed before (time t_next); n_red = 0 at the
    first processed step (no such step)."""
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
    return acc


@triton.jit
def _load_dout(dout_ptr, t, stride_do_t, stride_do_b, stride_do_u, offs_b64, u, bm):
    """The gradient of the outputs of step t at units u, in fp32."""
    d = tl.load(dout_ptr + t.to(tl.int64) * stride_do_t + offs_b64[:, None] * stride_do_b
                + u.to(tl.int64)[None, :] * stride_do_u, mask=bm, other=0.0)
    return d.to(tl.float32)


@triton.jit
def _lstm_gate_grads(dc, dh, i, f, g, o, c_prev, tc):
    """The LSTM's gate pre-activation gradients (di', df', dg', do') from dc, the gradient
    of c_t (h_t's share dh o (1 - tanh(c_t)^2) included), and dh, the gradient of h_t;
    tc = tanh(c_t).  Shared by the scan's backward and the training step's."""
    return (dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f), dc * i * (1.0 - g * g),
            dh * tc * o * (1.0 - o))


@triton.jit
def _gru_gate_grads(dh, r, z, n, hn, h_prev):
    """The GRU's pre-activation gradients (dr', dz', dn') from dh, the gradient of
    h_t = n + z (h_{t-1} - n): dn' = dh (1-z)(1-n^2), dz' = dh (h_{t-1} - n) z(1-z),
    dr' = dn' (W_hn h' + b_hn) r(1-r); the recurrent side's n row is r dn'.  Shared by the
    scan's backward and the training step's."""
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    return d_n * hn * r * (1.0 - r), dh * (h_prev - n) * z * (1.0 - z), d_n


@triton.jit
def _lstm_bwd_cell(dg_ptr, act_ptr, c_ptr, gc_ptr, dh, keep, passed, row, ju, unit, bm,
                   c_in, c_out, B, K: tl.constexpr, M: tl.constexpr, HAS_MASK: tl.constexpr):
    """The LSTM's backward at step t for a tile's units (``row``: their (group, t, batch)
    rows of the [K, T, B, .] buffers; ``unit``: their [B, H] offsets).  dh: the gradient of
    h_t (zero at padding), ``passed``: what a padded step hands on to h_{t-1}.  Writes the
    gate gradients (di', df', dg', do') and the carried dc; returns the gradient that goes
    to h_{t-1} directly (only ``passed``: h_{t-1} reaches h_t through the gates alone)."""
    H = K * M
    G = 4 * M
    a_base = act_ptr + row * G + ju[None, :]
    i = tl.load(a_base, mask=bm, other=0.0, cache_modifier=".cg")
    f = tl.load(a_base + M, mask=bm, other=0.0, cache_modifier=".cg")
    g = tl.load(a_base + 2 * M, mask=bm, other=0.0, cache_modifier=".cg")
    o = tl.load(a_base + 3 * M, mask=bm, other=0.0, cache_modifier=".cg")
    c_prev = tl.load(c_ptr + c_in.to(tl.int64) * B * H + unit, mask=bm, other=0.0,
                     cache_modifier=".cg")
    c_now = tl.load(c_ptr + c_out.to(tl.int64) * B * H + unit, mask=bm, other=0.0,
                    cache_modifier=".cg")
    gc = tl.load(gc_ptr + unit, mask=bm, other=0.0, cache_modifier=".cg")
    tc = _tanh(c_now)
    dc = gc + dh * o * (1.0 - tc * tc)
    if HAS_MASK:
        dc = dc * keep
        gc_new = dc * f + gc * (1.0 - keep)
    else:
        gc_new = dc * f
    d_i, d_f, d_g, d_o = _lstm_gate_grads(dc, dh, i, f, g, o, c_prev, tc)
    dg_t = dg_ptr + row * G + ju[None, :]
    out_ty = dg_ptr.dtype.element_ty
    tl.store(dg_t, d_i.to(out_ty), mask=bm)
    tl.store(dg_t + M, d_f.to(out_ty), mask=bm)
    tl.store(dg_t + 2 * M, d_g.to(out_ty), mask=bm)
    tl.store(dg_t + 3 * M, d_o.to(out_ty), mask=bm)
    tl.store(gc_ptr + unit, gc_new, mask=bm)
    return passed


@triton.jit
def _gru_bwd_cell(dg_ptr, dgx_ptr, act_ptr, h_ptr, dh, passed, row, ju, unit, bm, s_in, B,
                  K: tl.constexpr, M: tl.constexpr):
    """The GRU's backward at step t for a tile's units (arguments as in
    :func:`_lstm_bwd_cell`; h_ptr: the saved h slots).  Pre-activation gradients
    dn' = dh (1-z)(1-n^2), dz' = dh (h_{t-1} - n) z(1-z), dr' = dn' (W_hn h' + b_hn) r(1-r);
    the recurrent side gets (dr', dz', r dn') (dg_ptr: the next product, dW_hh, db_hh), the
    input side (dr', dz', dn') (dgx_ptr).  Returns z dh + ``passed``, the gradient that
    goes to the unit's own h_{t-1} through the interpolation."""
    H = K * M
    G = 3 * M
    a_base = act_ptr + row * (4 * M) + ju[None, :]
    r = tl.load(a_base, mask=bm, other=0.0, cache_modifier=".cg")
    z = tl.load(a_base + M, mask=bm, other=0.0, cache_modifier=".cg")
    n = tl.load(a_base + 2 * M, mask=bm, other=0.0, cache_modifier=".cg")
    hn = tl.load(a_base + 3 * M, mask=bm, other=0.0, cache_modifier=".cg")
    h_prev = tl.load(h_ptr + s_in.to(tl.int64) * B * H + unit, mask=bm, other=0.0,
                     cache_modifier=".cg")
    d_r, d_z, d_n = _gru_gate_grads(dh, r, z, n, hn, h_prev)
    off = row * G + ju[None, :]
    out_ty = dg_ptr.dtype.element_ty
    tl.store(dg_ptr + off, d_r.to(out_ty), mask=bm)
    tl.store(dg_ptr + off + M, d_z.to(out_ty), mask=bm)
    tl.store(dg_ptr + off + 2 * M, (d_n * r).to(out_ty), mask=bm)
    tl.store(dgx_ptr + off, d_r.to(out_ty), mask=bm)
    tl.store(dgx_ptr + off + M, d_z.to(out_ty), mask=bm)
    tl.store(dgx_ptr + off + 2 * M, d_n.to(out_ty), mask=bm)
    return dh * z + passed


@triton.jit
def _rnn_bwd_cell(dg_ptr, h_ptr, dh, passed, row, ju, unit, bm, s_now, B,
                  K: tl.constexpr, M: tl.constexpr):
    """The Elman RNN's backward at step t: the pre-activation gradient dh (1 - h_t^2) (input
    and recurrent side alike; h_t read from its slot s_now); h_{t-1} is reached through
    the product only, so -> ``passed``."""
    h_now = tl.load(h_ptr + s_now.to(tl.int64) * B * (K * M) + unit, mask=bm, other=0.0,
                    cache_modifier=".cg")
    d = dh * (1.0 - h_now * h_now)
    tl.store(dg_ptr + row * M + ju[None, :], d.to(dg_ptr.dtype.element_ty), mask=bm)
    return passed


@triton.jit
def _bwd_tile(
    CELL: tl.constexpr, pid_b, pid_u, dg_ptr, dgx_ptr, w_ptr, act_ptr, st_ptr, dout_ptr,
    stride_do_t, stride_do_b, stride_do_u, ph_ptr, gc_ptr, mask_ptr, dh0_ptr,
    t, t_next, n_red, s_in, B, T,
    K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOUT: tl.constexpr,
    DO_CELL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One backward step t for one tile (batch tile, operand positions q of group k): the
    gradient of h_t at the units u = src(q) that feed those positions (the operand gradient
    + what ph carries from later steps), then the cell's backward (DO_CELL; st_ptr: the
    saved c slots of the LSTM, h slots of the GRU and RNN) or, after the last step, dh_0."""
    H = K * M
    G = _gates(CELL) * M
    k, offs_b, offs_j, mask_b, mask_j = _tile(pid_b, pid_u, B, M, BLOCK_B, BLOCK_J)
    offs_b64 = offs_b.to(tl.int64)
    acc = _operand_grad(dg_ptr, w_ptr, k, t_next, n_red, offs_b64, mask_b, offs_j, mask_j,
                        B, T, G, M, BLOCK_B, BLOCK_J, BLOCK_N, PRECISION)
    u = _src_unit(k, offs_j, K, M, SHUFFLE)   # the unit read at operand position q
    bm = mask_b[:, None] & mask_j[None, :]
    unit = offs_b64[:, None] * H + u[None, :]
    s_h = acc + tl.load(ph_ptr + unit, mask=bm, other=0.0, cache_modifier=".cg")  # dL/dh_t
    if DO_CELL:
        row = ((u // M).to(tl.int64)[None, :] * T + t) * B + offs_b64[:, None]
        ju = u % M
        dh = s_h
        if HAS_DOUT:
            dh = dh + _load_dout(dout_ptr, t, stride_do_t, stride_do_b, stride_do_u,
                                 offs_b64, u, bm)
        if HAS_MASK:
            keep = _keep(mask_ptr, t, offs_b, mask_b, B).to(tl.float32)
            dh = dh * keep
            passed = s_h * (1.0 - keep)        # a padded step passes dh on to h_{t-1}
        else:
            keep = 1.0
            passed = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
        if CELL == "gru":
            ph_new = _gru_bwd_cell(dg_ptr, dgx_ptr, act_ptr, st_ptr, dh, passed, row, ju,
                                   unit, bm, s_in, B, K, M)
        elif CELL == "rnn":
            ph_new = _rnn_bwd_cell(dg_ptr, st_ptr, dh, passed, row, ju, unit, bm, t + 1, B,
                                   K, M)
        else:
            ph_new = _lstm_bwd_cell(dg_ptr, act_ptr, st_ptr, gc_ptr, dh, keep, passed, row,
                                    ju, unit, bm, s_in, t + 1, B, K, M, HAS_MASK)
        tl.store(ph_ptr + unit, ph_new, mask=bm)
    else:
        tl.store(dh0_ptr + unit, s_h, mask=bm)


@triton.jit(do_not_specialize=["B", "T", "P", "stride_do_t", "stride_do_b", "stride_do_u"])
def _scan_bwd(
    dg_ptr, dgx_ptr, w_ptr, act_ptr, st_ptr, dout_ptr, stride_do_t, stride_do_b, stride_do_u,
    ph_ptr, gc_ptr, mask_ptr, dh0_ptr, sync_ptr, err_ptr,
    B, T, P,
    CELL: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOUT: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, POLL: tl.constexpr,
):
    """The whole backward scan of a cell (time visited opposite to the forward), then dh_0.
    dg_ptr: the gradients of the recurrent pre-activations; dgx_ptr: those of the input
    side where they differ (GRU), gc_ptr: the carried dc (LSTM); unused ones are dummies."""
    pid = tl.program_id(0)
    G = _gates(CELL) * M
    n_u = K * ((M + BLOCK_J - 1) // BLOCK_J)
    n_tiles = ((B + BLOCK_B - 1) // BLOCK_B) * n_u
    limit = tl.full([], _SPIN_LIMIT, tl.int32)
    for step in range(0, T):
        if REVERSE:
            t = step
            t_next = step - 1
            s_in = t + 2
        else:
            t = T - 1 - step
            t_next = t + 1
            s_in = t
        n_red = tl.where(step > 0, G, 0)       # no step processed before the first
        for tile in range(pid, n_tiles, P):
            _bwd_tile(CELL, tile // n_u, tile % n_u, dg_ptr, dgx_ptr, w_ptr, act_ptr, st_ptr,
                      dout_ptr, stride_do_t, stride_do_b, stride_do_u, ph_ptr, gc_ptr,
                      mask_ptr, dh0_ptr, t, t_next, n_red, s_in, B, T, K, M, SHUFFLE,
                      HAS_MASK, HAS_DOUT, True, BLOCK_B, BLOCK_J, BLOCK_N, PRECISION)
        limit = _grid_sync(sync_ptr, err_ptr, (step + 1) * P, limit, POLL)
    if REVERSE:
        t_last = T - 1
    else:
        t_last = 0
    for tile in range(pid, n_tiles, P):
        _bwd_tile(CELL, tile // n_u, tile % n_u, dg_ptr, dgx_ptr, w_ptr, act_ptr, st_ptr,
                  dout_ptr, stride_do_t, stride_do_b, stride_do_u, ph_ptr, gc_ptr, mask_ptr,
                  dh0_ptr, 0, t_last, G, 0, B, T, K, M, SHUFFLE, HAS_MASK, HAS_DOUT,
                  False, BLOCK_B, BLOCK_J, BLOCK_N, PRECISION)


# ---------------------------------------------------------------------- decoding steps
@triton.jit
def _step_input(x_ptr, offs_b64, mask_b, k, r0, offs_j, mask_j, ty,
                K: tl.constexpr, MI: tl.constexpr, BLOCK_R: tl.constexpr):
    """Columns [r0, r0 + BLOCK_R) of group k's input x[:, k*MI:(k+1)*MI] (in ``ty``), and
    the offsets and mask of the matching [R, J] tile of W_ih[k]."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < MI
    xv = tl.load(x_ptr + offs_b64[:, None] * (K * MI) + (k * MI + offs_r)[None, :],
                 mask=mask_b[:, None] & mask_r[None, :], other=0.0).to(ty)
    return xv, offs_j[None, :] * MI + offs_r[:, None], mask_r[:, None] & mask_j[None, :]


@triton.jit
def _step_operand(h_ptr, op_ptr, own_op, offs_b64, mask_b, k, r0, offs_j, mask_j, B, ty,
                  K: tl.constexpr, M: tl.constexpr, SHUFFLE: tl.constexpr, SAVE: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """Operand positions [r0, r0 + BLOCK_R) of group k: shuffle(h_{t-1}) read from the state
    layout [K, B, M] (in ``ty``), and the offsets and mask of the matching W_hh[k] tile.
    With SAVE and the shuffle, the tiles of the first unit columns (``own_op``) also store
    it into op [K, B, M]: dW_hh's operand, for the training step's backward."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < M
    src = _src_unit(k, offs_r, K, M, SHUFFLE)
    hp = tl.load(h_ptr + (src // M).to(tl.int64)[None, :] * B * M + offs_b64[:, None] * M
                 + (src % M)[None, :], mask=mask_b[:, None] & mask_r[None, :],
                 other=0.0).to(ty)
    if SAVE:
        if SHUFFLE:
            if own_op:
                tl.store(op_ptr + k.to(tl.int64) * B * M + offs_b64[:, None] * M
                         + offs_r[None, :], hp, mask=mask_b[:, None] & mask_r[None, :])
    return hp, offs_j[None, :] * M + offs_r[:, None], mask_r[:, None] & mask_j[None, :]


@triton.jit
def _lstm_step_cell(x_ptr, h_ptr, c_ptr, c_new_ptr, act_ptr, op_ptr, own_op, wi_base,
                    wh_base, bih_ptr, bhh_ptr, bias, state, offs_b, offs_b64, mask_b, k,
                    offs_j, mask_j, bm, B, ty, K: tl.constexpr, M: tl.constexpr,
                    MI: tl.constexpr, SHUFFLE: tl.constexpr, SAVE: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
                    PRECISION: tl.constexpr):
    """The LSTM's step for a tile: gates = x_t W_ih^T + b_ih + shuffle(h_{t-1}) W_hh^T +
    b_hh, c_t (stored), with SAVE the activations i, f, g, o (into act [K, B, 4M]) ->
    h_t."""
    acc_i = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, MI, BLOCK_R):
        xv, w_off, w_mask = _step_input(x_ptr, offs_b64, mask_b, k, r0, offs_j, mask_j, ty,
                                        K, MI, BLOCK_R)
        acc_i, acc_f, acc_g, acc_o = _add_gate_products(
            acc_i, acc_f, acc_g, acc_o, xv, wi_base + w_off, w_mask, M * MI, PRECISION)
    for r0 in range(0, M, BLOCK_R):
        hp, w_off, w_mask = _step_operand(h_ptr, op_ptr, own_op, offs_b64, mask_b, k, r0,
                                          offs_j, mask_j, B, ty, K, M, SHUFFLE, SAVE, BLOCK_R)
        acc_i, acc_f, acc_g, acc_o = _add_gate_products(
            acc_i, acc_f, acc_g, acc_o, hp, wh_base + w_off, w_mask, M * M, PRECISION)
    i = _sigmoid(acc_i + _bias_sum(bih_ptr, bhh_ptr, bias, mask_j)[None, :])
    f = _sigmoid(acc_f + _bias_sum(bih_ptr, bhh_ptr, bias + M, mask_j)[None, :])
    g = _tanh(acc_g + _bias_sum(bih_ptr, bhh_ptr, bias + 2 * M, mask_j)[None, :])
    o = _sigmoid(acc_o + _bias_sum(bih_ptr, bhh_ptr, bias + 3 * M, mask_j)[None, :])
    c = f * tl.load(c_ptr + state, mask=bm, other=0.0).to(tl.float32) + i * g
    tl.store(c_new_ptr + state, c.to(c_new_ptr.dtype.element_ty), mask=bm)
    if SAVE:
        _store_acts(act_ptr, k, 0, offs_b, offs_j, bm, i, f, g, o, B, 1, M)
    return o * _tanh(c)


@triton.jit
def _gru_step_cell(x_ptr, h_ptr, act_ptr, op_ptr, own_op, wi_base, wh_base, bih_ptr, bhh_ptr,
                   bias, state, offs_b, offs_b64, mask_b, k, offs_j, mask_j, bm, B, ty,
                   K: tl.constexpr, M: tl.constexpr, MI: tl.constexpr, SHUFFLE: tl.constexpr,
                   SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """The GRU's step for a tile: r and z from both products, n = tanh(x W_in^T + b_in +
    r (shuffle(h_{t-1}) W_hn^T + b_hn)), with SAVE r, z, n and W_hn h' + b_hn (into act
    [K, B, 4M]) -> h_t = n + z (h_{t-1} - n)."""
    acc_r = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_xn = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_hn = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, MI, BLOCK_R):
        xv, w_off, w_mask = _step_input(x_ptr, offs_b64, mask_b, k, r0, offs_j, mask_j, ty,
                                        K, MI, BLOCK_R)
        acc_r, acc_z, acc_xn = _add_products3(acc_r, acc_z, acc_xn, xv, wi_base + w_off,
                                              w_mask, M * MI, PRECISION)
    for r0 in range(0, M, BLOCK_R):
        hp, w_off, w_mask = _step_operand(h_ptr, op_ptr, own_op, offs_b64, mask_b, k, r0,
                                          offs_j, mask_j, B, ty, K, M, SHUFFLE, SAVE, BLOCK_R)
        acc_r, acc_z, acc_hn = _add_products3(acc_r, acc_z, acc_hn, hp, wh_base + w_off,
                                              w_mask, M * M, PRECISION)
    r = _sigmoid(acc_r + _bias_sum(bih_ptr, bhh_ptr, bias, mask_j)[None, :])
    z = _sigmoid(acc_z + _bias_sum(bih_ptr, bhh_ptr, bias + M, mask_j)[None, :])
    b_in = tl.load(bih_ptr + bias + 2 * M, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    b_hn = tl.load(bhh_ptr + bias + 2 * M, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    hn = acc_hn + b_hn
    n = _tanh(acc_xn + b_in + r * hn)
    if SAVE:
        _store_acts(act_ptr, k, 0, offs_b, offs_j, bm, r, z, n, hn, B, 1, M)
    h_prev = tl.load(h_ptr + state, mask=bm, other=0.0).to(tl.float32)
    return n + z * (h_prev - n)


@triton.jit
def _rnn_step_cell(x_ptr, h_ptr, act_ptr, op_ptr, own_op, wi_base, wh_base, bih_ptr, bhh_ptr,
                   bias, state, offs_b64, mask_b, k, offs_j, mask_j, bm, B, ty,
                   K: tl.constexpr, M: tl.constexpr, MI: tl.constexpr, SHUFFLE: tl.constexpr,
                   SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """The Elman RNN's step for a tile: -> h_t = tanh(x W_ih^T + b_ih + shuffle(h_{t-1})
    W_hh^T + b_hh), with SAVE also into act [K, B, M] in fp32."""
    acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, MI, BLOCK_R):
        xv, w_off, w_mask = _step_input(x_ptr, offs_b64, mask_b, k, r0, offs_j, mask_j, ty,
                                        K, MI, BLOCK_R)
        acc += tl.dot(xv, tl.load(wi_base + w_off, mask=w_mask, other=0.0),
                      input_precision=PRECISION)
    for r0 in range(0, M, BLOCK_R):
        hp, w_off, w_mask = _step_operand(h_ptr, op_ptr, own_op, offs_b64, mask_b, k, r0,
                                          offs_j, mask_j, B, ty, K, M, SHUFFLE, SAVE, BLOCK_R)
        acc += tl.dot(hp, tl.load(wh_base + w_off, mask=w_mask, other=0.0),
                      input_precision=PRECISION)
    h = _tanh(acc + _bias_sum(bih_ptr, bhh_ptr, bias, mask_j)[None, :])
    if SAVE:
        tl.store(act_ptr + state, h, mask=bm)
    return h


@triton.jit
def _shuffled_column(k, offs_j, K: tl.constexpr, M: tl.constexpr, SHUFFLED: tl.constexpr):
    """[1, J] columns of units k*M + offs_j in a [B, K*M] row: unit order, or with
    SHUFFLED the rearranged order (unit k*M + j at j*K + k)."""
    if SHUFFLED:
        col = offs_j * K + k
    else:
        col = k * M + offs_j
    return col.to(tl.int64)[None, :]


@triton.jit(do_not_specialize=["B"])
def _decode_step(
    x_ptr, wih_ptr, bih_ptr, whh_ptr, bhh_ptr, h_ptr, c_ptr, h_new_ptr, c_new_ptr, out_ptr,
    act_ptr, op_ptr, B,
    CELL: tl.constexpr, K: tl.constexpr, M: tl.constexpr, MI: tl.constexpr,
    SHUFFLE: tl.constexpr, SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, OUT_SHUFFLE: tl.constexpr,
):
    """One step of one layer for a tile (batch tile, group k, m-units tile), the input
    projection, the recurrent product and the cell fused.  x: [B, K*MI];
    W_ih: [K, G*M, MI]; W_hh: [K, G*M, M]; h, c (in and out; c for the LSTM only, unused
    dummies for the GRU and RNN): [K, B, M]; out: [B, K*M] (the layer output, unit
    order; with OUT_SHUFFLE in the order of the rearrangement between layers, unit k*M + j
    at j*K + k, which the next layer reads as it is).  SAVE (the training step,
    :class:`_TritonStep`): also what the backward needs, into act [K, B, A*M] (A = 4 LSTM,
    4 GRU, 1 RNN, fp32) and, with SHUFFLE, the shuffled operand into op [K, B, M]
    (dummies otherwise)."""
    G = _gates(CELL) * M
    k, offs_b, offs_j, mask_b, mask_j = _tile(tl.program_id(0), tl.program_id(1), B, M,
                                              BLOCK_B, BLOCK_J)
    offs_b64 = offs_b.to(tl.int64)
    ty = whh_ptr.dtype.element_ty
    wi_base = wih_ptr + k.to(tl.int64) * G * MI
    wh_base = whh_ptr + k.to(tl.int64) * G * M
    bias = k * G + offs_j
    bm = mask_b[:, None] & mask_j[None, :]
    state = k.to(tl.int64) * B * M + offs_b64[:, None] * M + offs_j[None, :]
    own_op = tl.program_id(1) % ((M + BLOCK_J - 1) // BLOCK_J) == 0  # first unit columns
    if CELL == "gru":
        h = _gru_step_cell(x_ptr, h_ptr, act_ptr, op_ptr, own_op, wi_base, wh_base, bih_ptr,
                           bhh_ptr, bias, state, offs_b, offs_b64, mask_b, k, offs_j, mask_j,
                           bm, B, ty, K, M, MI, SHUFFLE, SAVE, BLOCK_B, BLOCK_J, BLOCK_R,
                           PRECISION)
    elif CELL == "rnn":
        h = _rnn_step_cell(x_ptr, h_ptr, act_ptr, op_ptr, own_op, wi_base, wh_base, bih_ptr,
                           bhh_ptr, bias, state, offs_b64, mask_b, k, offs_j, mask_j, bm, B,
                           ty, K, M, MI, SHUFFLE, SAVE, BLOCK_B, BLOCK_J, BLOCK_R, PRECISION)
    else:
        h = _lstm_step_cell(x_ptr, h_ptr, c_ptr, c_new_ptr, act_ptr, op_ptr, own_op, wi_base,
                            wh_base, bih_ptr, bhh_ptr, bias, state, offs_b, offs_b64, mask_b, k,
                            offs_j, mask_j, bm, B, ty, K, M, MI, SHUFFLE, SAVE, BLOCK_B,
                            BLOCK_J, BLOCK_R, PRECISION)
    tl.store(h_new_ptr + state, h.to(h_new_ptr.dtype.element_ty), mask=bm)
    out_cols = _shuffled_column(k, offs_j, K, M, OUT_SHUFFLE)
    tl.store(out_ptr + offs_b64[:, None] * (K * M) + out_cols, h.to(out_ptr.dtype.element_ty),
             mask=bm)


@triton.jit(do_not_specialize=["B"])
def _step_bwd(dout_ptr, so_b, so_u, dh_ptr, sh_k, sh_b, sh_j, dc_ptr, sc_k, sc_b, sc_j,
              act_ptr, st_ptr, dg_ptr, dgh_ptr, dst_ptr, dhp_ptr, B,
              CELL: tl.constexpr, K: tl.constexpr, M: tl.constexpr, SHUFFLE: tl.constexpr,
              HAS_DOUT: tl.constexpr, HAS_DH: tl.constexpr, HAS_DC: tl.constexpr,
              DIRECT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
              OUT_SHUFFLE: tl.constexpr):
    """The cell's backward of a training step (:class:`_TritonStep`) for a tile.

    Reads the gradients of the step's outputs (out [B, K*M]; h_t and, for the LSTM, c_t,
    [K, B, M]; each through its own strides, so that autograd's views, e.g. the unshuffled
    gradient of the next step, are read as they are; a missing one is zero; out's columns
    in the forward's order, OUT_SHUFFLE) and the saved act (:func:`_decode_step`); writes
    the gates' pre-activation gradients dG [K, B, G*M] (the GRU: dgx on the input side and
    dgh on the recurrent side, which differ in n) and what passes to step t-1 per unit:
    the LSTM dc_{t-1} [K, B, M] (``dst``), from st = c_{t-1}; the GRU, with DIRECT, z dh
    into dh_{t-1}'s [B, K*M] buffer at the unit's operand position (``dhp``; the host then
    adds the product of dgh with W_hh), from st = h_{t-1}.  The LSTM's c_t = f c_{t-1} + i g
    is recomputed in fp32, as the forward had it (the stored c_t may be half precision)."""
    k, offs_b, offs_j, mask_b, mask_j = _tile(tl.program_id(0), tl.program_id(1), B, M,
                                              BLOCK_B, BLOCK_J)
    offs_b64 = offs_b.to(tl.int64)
    k64 = k.to(tl.int64)
    bm = mask_b[:, None] & mask_j[None, :]
    state = k64 * B * M + offs_b64[:, None] * M + offs_j[None, :]
    dh = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    if HAS_DOUT:
        dh += tl.load(dout_ptr + offs_b64[:, None] * so_b
                      + _shuffled_column(k, offs_j, K, M, OUT_SHUFFLE) * so_u,
                      mask=bm, other=0.0).to(tl.float32)
    if HAS_DH:
        dh += tl.load(dh_ptr + k64 * sh_k + offs_b64[:, None] * sh_b + offs_j[None, :] * sh_j,
                      mask=bm, other=0.0).to(tl.float32)
    ty = dg_ptr.dtype.element_ty
    if CELL == "rnn":
        h = tl.load(act_ptr + state, mask=bm, other=0.0)
        tl.store(dg_ptr + state, (dh * (1.0 - h * h)).to(ty), mask=bm)
    else:
        gate = (k64 * B + offs_b64)[:, None] * (4 * M) + offs_j[None, :]
        a0 = tl.load(act_ptr + gate, mask=bm, other=0.0)
        a1 = tl.load(act_ptr + gate + M, mask=bm, other=0.0)
        a2 = tl.load(act_ptr + gate + 2 * M, mask=bm, other=0.0)
        a3 = tl.load(act_ptr + gate + 3 * M, mask=bm, other=0.0)
        st = tl.load(st_ptr + state, mask=bm, other=0.0).to(tl.float32)
        if CELL == "gru":                # a = r, z, n, W_hn h' + b_hn; st = h_{t-1}
            g3 = (k64 * B + offs_b64)[:, None] * (3 * M) + offs_j[None, :]
            dpr, dpz, dpn = _gru_gate_grads(dh, a0, a1, a2, a3, st)
            tl.store(dg_ptr + g3, dpr.to(ty), mask=bm)
            tl.store(dg_ptr + g3 + M, dpz.to(ty), mask=bm)
            tl.store(dg_ptr + g3 + 2 * M, dpn.to(ty), mask=bm)
            tl.store(dgh_ptr + g3, dpr.to(ty), mask=bm)
            tl.store(dgh_ptr + g3 + M, dpz.to(ty), mask=bm)
            tl.store(dgh_ptr + g3 + 2 * M, (dpn * a0).to(ty), mask=bm)
            if DIRECT:   # unit k*M + j at its operand position (j*K + k with SHUFFLE)
                tl.store(dhp_ptr + offs_b64[:, None] * (K * M)
                         + _shuffled_column(k, offs_j, K, M, SHUFFLE),
                         (dh * a1).to(dhp_ptr.dtype.element_ty), mask=bm)
        else:                            # a = i, f, g, o; st = c_{t-1}
            dc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
            if HAS_DC:
                dc += tl.load(dc_ptr + k64 * sc_k + offs_b64[:, None] * sc_b
                              + offs_j[None, :] * sc_j, mask=bm, other=0.0).to(tl.float32)
            tc = _tanh(a1 * st + a0 * a2)
            dc += dh * a3 * (1.0 - tc * tc)                   # h_t = o tanh(c_t)
            d_i, d_f, d_g, d_o = _lstm_gate_grads(dc, dh, a0, a1, a2, a3, st, tc)
            _store_acts(dg_ptr, k, 0, offs_b, offs_j, bm, d_i.to(ty), d_f.to(ty), d_g.to(ty),
                        d_o.to(ty), B, 1, M)
            tl.store(dst_ptr + state, (dc * a1).to(dst_ptr.dtype.element_ty), mask=bm)


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
# Variants of the persistent scans, for A/B runs on a GPU (bench_layer.py --backend
# triton,triton+load,triton+resident); the defaults are the variants measured so far.
# GRNN_TRITON_POLL=atomic|load: how programs wait at a time-step barrier (_grid_sync);
# GRNN_TRITON_RESIDENT=0|1: the LSTM forward loads each tile's W_hh slices once per scan
# instead of once per step, where one program per tile fits the GPU (_resident);
# GRNN_TRITON_PERM=0|1: with the time-step shuffle, the scans get W_hh with its columns
# permuted so that the units a tile reads or owns are contiguous runs (_shuffle_order);
# GRNN_TRITON_TRAIN_STEP=0|1: a layer's step with autograd (RNNSearch's decoder in
# training) runs as the fused step and its own backward (_TritonStep) instead of separate
# autograd ops (train_step_on).
VARIANT = {"poll": os.environ.get("GRNN_TRITON_POLL", "atomic"),
           "resident": os.environ.get("GRNN_TRITON_RESIDENT", "0"),
           "perm": os.environ.get("GRNN_TRITON_PERM", "0"),
           "train_step": os.environ.get("GRNN_TRITON_TRAIN_STEP", "0")}
POLLS = ("atomic", "load")
# the most bytes of resident W_hh slices per program (4 gates x M x BLOCK_J)
_RESIDENT_BYTES = 32 * 1024


@functools.lru_cache(maxsize=None)
def _parse_blocks(raw):
    try:
        vals = tuple(int(v) for v in raw.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4 or any(v < 16 or v & (v - 1) for v in vals[:3]) or \
            vals[3] not in (1, 2, 4, 8, 16):
        raise ConfigError(f"GRNN_TRITON_BLOCKS={raw!r}: expected four integers bb,bj,br,warps "
                          "(block sizes powers of two >= 16, warps 1-16), e.g. 32,16,64,4")
    return vals


@functools.lru_cache(maxsize=None)
def _parse_programs(raw):
    try:
        p = int(raw)
    except ValueError:
        p = 0
    if p < 1:
        raise ConfigError(f"GRNN_TRITON_PROGRAMS={raw!r}: expected a positive integer (the "
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


@functools.lru_cache(maxsize=None)
def _parse_variant(poll, resident, perm):
    """-> (poll, resident, perm) of VARIANT, checked."""
    if poll not in POLLS:
        raise ConfigError(f"GRNN_TRITON_POLL={poll!r}: expected one of {', '.join(POLLS)}")
    return poll, _switch("RESIDENT", resident), _switch("PERM", perm)


def _switch(name, value):
    """A 0|1 variant switch GRNN_TRITON_<name>, checked -> bool."""
    return switch(f"GRNN_TRITON_{name}", value)


def train_step_on():
    """Whether VARIANT['train_step'] is on (GRNN_TRITON_TRAIN_STEP, checked)."""
    return _switch("TRAIN_STEP", VARIANT["train_step"])


def _variant():
    """-> (poll, resident, perm): VARIANT as it is now (read at every launch)."""
    return _parse_variant(VARIANT["poll"], VARIANT["resident"], VARIANT["perm"])


def _shuffle_order(time_shuffle, k, m, perm):
    """The scans' SHUFFLE (:func:`_src_unit`): 0 without the time-step shuffle; with it, 2
    where VARIANT['perm'] is on and K > 1 divides m, else 1.

    With 1, the operand positions q of a tile read units (q % K) * m + q // K, runs of
    one unit per group (at K=16 and 16 positions: 16 units in 16 places), and the backward
    tile owns those same scattered units, whose activations, states and gradients it then
    loads and stores one by one.  With 2, the kernels get W_hh with its columns reordered
    (:func:`_kernel_weights`; the sum over operand positions does not depend on their
    order) so that group k's positions are, for each source group in turn, its M/K
    contiguous units: runs of min(M/K, block) units.  The decoding step keeps 1 (one
    product per step, no room for a copy of W_hh)."""
    if not time_shuffle:
        return 0
    return 2 if perm and k > 1 and m % k == 0 else 1


@functools.lru_cache(maxsize=64)
def _column_order(k, m, device):
    """Column p of W_hh as the scans read it with SHUFFLE 2 = column (p % C) * K + p // C of
    W_hh (C = m/K): its operand position q, whose unit :func:`_src_unit` maps alike."""
    p = torch.arange(m)
    c = m // k
    return ((p % c) * k + p // c).to(device)


def _kernel_weights(w, order):
    """W_hh [K, G*m, m] as the scans read it: with SHUFFLE 2, its columns reordered."""
    if order != 2:
        return w
    k, _, m = w.shape
    return w.index_select(2, _column_order(k, m, w.device))


def _resident(cell, m, bj, itemsize, n_tiles, n_prog, t_len):
    """Whether the forward scan keeps W_hh resident (VARIANT['resident']): the LSTM, m a
    power of two (one product over all of m), the slices within _RESIDENT_BYTES, and a
    persistent grid (:func:`_grid`) of one program per tile.  The interpreter runs programs
    one after another (its grid is one program), so there several programs can also run
    where none waits at a barrier: over one step."""
    if cell != "lstm" or m & (m - 1) or m < 16 or 4 * m * bj * itemsize > _RESIDENT_BYTES:
        return False
    return n_prog == n_tiles or (_interpreting() and t_len == 1)


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
    """Block sizes, P (the persistent grid: every program must be resident at once, so one
    per SM at most, fewer with GRNN_TRITON_PROGRAMS; the interpreter runs programs one by
    one, so there P = 1) and the number of tiles."""
    n_sm = 1 << 30 if _interpreting() else _sm_count(device)
    bb, bj, br, nw = _blocks(b, m, k, n_sm)
    n_tiles = _cdiv(b, bb) * k * _cdiv(m, bj)
    if _interpreting():
        p = 1
    elif _FORCED_PROGRAMS:
        p = max(1, min(n_tiles, _parse_programs(_FORCED_PROGRAMS)))
    else:
        p = max(1, min(n_tiles, n_sm))
    return bb, bj, br, nw, p, n_tiles


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
            "grnn_fairseq Triton recurrence: the programs of a persistent kernel were not all "
            "resident on the GPU at once (another process or stream holds SMs), so a "
            "time-step barrier gave up and results since the last check are invalid. "
            "Set GRNN_TRITON_PROGRAMS to a smaller number of programs, or use "
            "GRNN_BACKEND=torch (for the GRU: reference).")


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


def _forward(cell, gx, state, weight_hh, bias_hh, mask, time_shuffle, reverse, save):
    """The forward scan of ``cell`` -> (out [T, B, H], final state tuple of [K, B, m],
    saved buffers for the backward or None)."""
    t_len, k, b, gm = gx.shape
    m = gm // GATES[cell]
    width = k * m
    lstm = cell == "lstm"
    if gx.stride(-1) != 1:
        gx = gx.contiguous()
    w = weight_hh.contiguous()
    bias = bias_hh.contiguous()
    n_slots = t_len + 2 if save else 2
    hs = gx.new_empty(n_slots, b, width, dtype=torch.float32)
    cs = gx.new_empty(n_slots, b, width, dtype=torch.float32) if lstm else None
    if save:
        first, last = (t_len + 1, 1) if reverse else (0, t_len)
    else:
        first, last = 0, t_len % 2
    hs[first] = _flat(state[0])
    if lstm:
        cs[first] = _flat(state[1])
    out = gx.new_empty(t_len, b, width)
    acts = (gx.new_empty(k, t_len, b, ACTS[cell] * m, dtype=torch.float32)
            if save and ACTS[cell] else out)
    mask8 = mask.to(torch.int8).contiguous() if mask is not None else out
    bb, bj, br, nw, n_prog, n_tiles = _grid(b, m, k, gx.device)
    poll, resident, perm = _variant()
    resident = resident and _resident(cell, m, bj, w.element_size(), n_tiles, n_prog, t_len)
    order = _shuffle_order(time_shuffle, k, m, perm)
    if resident:
        br, n_prog = m, n_tiles
    sync, err = _sync_buffers(gx.device)
    _scan_fwd[(n_prog,)](
        gx, gx.stride(0), gx.stride(1), gx.stride(2), _kernel_weights(w, order),
        bias, hs, cs if lstm else hs, out, acts, mask8, sync, err, b, t_len, n_prog,
        CELL=cell, K=k, M=m, SHUFFLE=order, HAS_MASK=mask is not None, SAVE=save,
        REVERSE=bool(reverse), BLOCK_B=bb, BLOCK_J=bj, BLOCK_R=br,
        PRECISION=_precision(w.dtype), POLL=poll, RESIDENT=resident, num_warps=nw,
    )
    _check_health(gx.device)
    final = tuple(_grouped(s[last], k, gx.dtype) for s in ((hs, cs) if lstm else (hs,)))
    return out, final, ((acts, hs, cs, (k, t_len, b, m)) if save else None)


def _backward(ctx, d_out, d_state):
    """-> (d_gx [T, K, B, G*m], d_weight_hh, d_bias_hh, gradients of the initial state)."""
    acts, hs, cs, (k, t_len, b, m) = ctx.buffers
    w, = ctx.saved_tensors
    cell = ctx.cell
    lstm = cell == "lstm"
    gm = GATES[cell] * m
    width = k * m
    dtype, mask, time_shuffle, reverse = ctx.dtype, ctx.mask, ctx.time_shuffle, ctx.reverse
    dg = hs.new_empty(k, t_len, b, gm, dtype=dtype)         # recurrent pre-activations
    dgx = torch.empty_like(dg) if cell == "gru" else dg     # input side (GRU: n differs)
    ph = _flat(d_state[0]) if d_state[0] is not None else hs.new_zeros(b, width)
    if lstm:
        gc = _flat(d_state[1]) if d_state[1] is not None else hs.new_zeros(b, width)
    else:
        gc = ph                                             # unused
    dh0 = hs.new_empty(b, width)
    mask8 = mask.to(torch.int8).contiguous() if mask is not None else ph
    has_dout = d_out is not None
    if not has_dout:
        d_out = ph
        strides = (0, 0, 0)
    else:
        strides = d_out.stride()
    bb, bj, _, nw, n_prog, _ = _grid(b, m, k, hs.device)
    bn = _pow2(gm, 16, 64)
    sync, err = _sync_buffers(hs.device)
    poll, _, perm = _variant()
    order = _shuffle_order(time_shuffle, k, m, perm)
    _scan_bwd[(n_prog,)](
        dg, dgx, _kernel_weights(w, order), acts, cs if lstm else hs, d_out, *strides, ph, gc,
        mask8, dh0, sync, err, b, t_len, n_prog,
        CELL=cell, K=k, M=m, SHUFFLE=order, HAS_MASK=mask is not None,
        HAS_DOUT=has_dout, REVERSE=bool(reverse), BLOCK_B=bb, BLOCK_J=bj, BLOCK_N=bn,
        PRECISION=_precision(w.dtype), POLL=poll, num_warps=nw)
    _check_health(hs.device)
    # dW_hh[k] = sum_t dG_t[k]^T h_in_t[k]: h_in_t = the state slot before t, shuffled
    h_in = hs[2:] if reverse else hs[:t_len]                      # [T, B, H] unit order
    if time_shuffle:
        h_in = h_in.view(t_len, b, k, m).transpose(2, 3)           # rearrange(): j*K + k
    h_in = h_in.reshape(t_len * b, k, m).transpose(0, 1).to(dtype)  # [K, T*B, m]
    d_w = torch.bmm(dg.view(k, t_len * b, gm).transpose(1, 2), h_in)
    d_b = dg.sum((1, 2), dtype=torch.float32).to(dtype)
    d_init = (_grouped(dh0, k, dtype),) + ((_grouped(gc, k, dtype),) if lstm else ())
    return dgx.transpose(0, 1), d_w.to(w.dtype), d_b, d_init


class _TritonScan(torch.autograd.Function):
    """The whole recurrence of one layer direction as one autograd node."""

    @staticmethod
    def forward(ctx, cell, gx, weight_hh, bias_hh, mask, time_shuffle, reverse, *state):
        out, final, saved = _forward(cell, gx, state, weight_hh, bias_hh, mask, time_shuffle,
                                     reverse, save=True)
        ctx.buffers = saved
        ctx.save_for_backward(weight_hh.contiguous())
        ctx.cell, ctx.dtype, ctx.mask = cell, gx.dtype, mask
        ctx.time_shuffle, ctx.reverse = time_shuffle, reverse
        return (out,) + final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, *d_state):
        d_gx, d_w, d_b, d_init = _backward(ctx, d_out, d_state)
        return (None, d_gx, d_w, d_b, None, None, None) + d_init


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(cell, dtype):
    if cell not in CELLS:
        raise ValueError(f"the Triton kernels cover the cells {CELLS}, not {cell!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels support {SUPPORTED_DTYPES}, got {dtype}")


def scan_triton(cell, gx, state, weight_hh, bias_hh, mask=None, time_shuffle=False,
                reverse=False):
    """``engine.scan`` for the LSTM, the GRU or the Elman RNN with the Triton kernels.

    gx: [T, K, B, G*m] (G = 4 LSTM, 3 GRU, 1 RNN); state: (h0, c0) (LSTM) or (h0,), each
    [K, B, m]; weight_hh: [K, G*m, m]; bias_hh: [K, G*m]; mask: [T, B] bool (True at
    tokens) or None.  -> (out [T, K, B, m], final state tuple).
    """
    _check(cell, gx.dtype)
    t_len, k, b, gm = gx.shape
    if t_len == 0:
        return gx.new_zeros(0, k, b, gm // GATES[cell]), tuple(state)
    need_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (gx, weight_hh, bias_hh, *state))
    if need_grad:
        out, *final = _TritonScan.apply(cell, gx, weight_hh, bias_hh, mask, time_shuffle,
                                        reverse, *state)
    else:
        with torch.no_grad():
            out, final, _ = _forward(cell, gx, state, weight_hh, bias_hh, mask, time_shuffle,
                                     reverse, save=False)
    return out.view(t_len, b, k, -1).transpose(1, 2), tuple(final)


def step_triton(cell, x, state, weight_ih, bias_ih, weight_hh, bias_hh, time_shuffle=False,
                out_shuffle=False):
    """One decoding step of one layer, fused into one launch (no autograd).

    x: [B, I]; state: (h, c) (LSTM) or (h,), each [K, B, m]; weight_ih: [K, G*m, I/K];
    bias_ih: [K, G*m]; weight_hh: [K, G*m, m]; bias_hh: [K, G*m]
    ->  (out [B, K*m], new state tuple); out_shuffle: out in the order of the
    rearrangement between layers (``rearrange(out, K)``), as the next layer reads it.
    Operands in the weights' dtype; the gates are computed in fp32.
    """
    # this runs once per layer and token: plain statements, no generators
    k, gm, mi = weight_ih.shape
    ty = weight_hh.dtype
    gates = GATES.get(cell)
    if gates is None or ty not in SUPPORTED_DTYPES:
        _check(cell, ty)
    x = x.to(ty).contiguous()
    h = state[0].contiguous()
    h_new = torch.empty_like(h)
    if cell == "lstm":
        c = state[1].contiguous()
        c_new = torch.empty_like(c)
        new = (h_new, c_new)
    else:                        # no c: h stands in for the kernel's unused c pointers
        c, c_new = h, h_new
        new = (h_new,)
    out = x.new_empty(x.shape[0], k * (gm // gates))
    _launch_step(cell, x, h, c, weight_ih.contiguous(), bias_ih.contiguous(),
                 weight_hh.contiguous(), bias_hh.contiguous(), h_new, c_new, out, out, out,
                 time_shuffle, False, out_shuffle)
    return out, new


def _launch_step(cell, x, h, c, w_ih, b_ih, w_hh, b_hh, h_new, c_new, out, acts, operand,
                 time_shuffle, save, out_shuffle):
    """Launch :func:`_decode_step` on contiguous tensors (``acts``, ``operand``: dummies
    unless save; out_shuffle: ``out`` in the order of the rearrangement between layers)."""
    k, gm, mi = w_ih.shape
    m = gm // GATES[cell]
    b = x.shape[0]
    bb, bj, br, nw = _decode_blocks(b, m, mi)
    _decode_step[(_cdiv(b, bb), k * _cdiv(m, bj))](
        x, w_ih, b_ih, w_hh, b_hh, h, c, h_new, c_new, out, acts, operand, b,
        CELL=cell, K=k, M=m, MI=mi, SHUFFLE=bool(time_shuffle), SAVE=save, BLOCK_B=bb,
        BLOCK_J=bj, BLOCK_R=br, PRECISION=_precision(w_hh.dtype),
        OUT_SHUFFLE=bool(out_shuffle) and k > 1, num_warps=nw)


class _TritonStep(torch.autograd.Function):
    """One step of one layer with autograd (RNNSearch's decoder, trained step by step), for
    every cell.

    Forward: the fused step (:func:`_decode_step`, one launch), which also saves the
    activations and, with the time-step shuffle, the shuffled operand.  Backward: one
    launch for the cell (:func:`_step_bwd`, reading the output gradients through their
    strides), then the products of dG in cuBLAS, written where their consumers read them:
    dx through a strided view of its [B, K*mi] buffer; dh_{t-1} into a [B, K*m] buffer in
    operand order (the GRU's z dh already in it), returned as the view that undoes the
    shuffle, which the previous step's backward reads in place; dW_ih, dW_hh, and the bias
    sums.  Against the same step as separate autograd ops, the LSTM decoder of RNNSearch
    needs about a third of the launches forward and half backward
    (results/gpu_h100/step_launches.txt).  With ``grads`` (a
    :class:`~grnn_fairseq.sequence_weights.WeightGrads`, from
    :func:`~grnn_fairseq.sequence_weights.sequence_weights`)
    the backward hands dG, x and the operand over to it instead of computing the weight
    gradients, which :class:`~grnn_fairseq.sequence_weights.SequenceWeights` then
    computes for all steps at once."""

    @staticmethod
    def forward(ctx, cell, shuffles, grads, x, weight_ih, bias_ih, weight_hh, bias_hh,
                *state):
        time_shuffle, out_shuffle = shuffles
        k, gm, mi = weight_ih.shape
        m, b = gm // GATES[cell], x.shape[0]
        shuffle = time_shuffle and k > 1
        ctx.out_shuffle = out_shuffle and k > 1
        lstm = cell == "lstm"
        x, h = x.contiguous(), state[0].contiguous()
        w_ih, w_hh = weight_ih.contiguous(), weight_hh.contiguous()
        h_new = torch.empty_like(h)
        c = state[1].contiguous() if lstm else h
        c_new = torch.empty_like(c) if lstm else h_new
        out = x.new_empty(b, k * m)
        # the scan's activations; the RNN's step saves h_t, which the scan has in its slots
        acts = torch.empty(k, b, (ACTS[cell] or 1) * m, dtype=torch.float32, device=x.device)
        operand = torch.empty(h.shape, dtype=w_hh.dtype, device=x.device) if shuffle else h
        _launch_step(cell, x, h, c, w_ih, bias_ih.contiguous(), w_hh, bias_hh.contiguous(),
                     h_new, c_new, out, acts, operand, shuffle, True, ctx.out_shuffle)
        # what the cell's backward reads of the previous state: the LSTM c, the GRU h
        ctx.save_for_backward(x, c if lstm else h, w_ih, w_hh, acts, operand)
        ctx.cell, ctx.shuffle, ctx.grads = cell, shuffle, grads
        # SequenceWeights' node (the weights' grad_fn), which the backward asks about
        ctx.weights_node = None if grads is None else weight_ih.grad_fn
        return (out, h_new, c_new) if lstm else (out, h_new)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_h, d_c=None):
        x, st, w_ih, w_hh, acts, operand = ctx.saved_tensors
        cell, shuffle = ctx.cell, ctx.shuffle
        lstm, gru = cell == "lstm", cell == "gru"
        k, gm, mi = w_ih.shape
        m, b = gm // GATES[cell], x.shape[0]
        # inputs: cell, shuffles, grads, x, W_ih, b_ih, W_hh, b_hh, h (, c)
        need = ctx.needs_input_grad[1:]  # from shuffles on: x is need[2]
        dg = torch.empty(k, b, gm, dtype=w_hh.dtype, device=x.device)
        dgh = torch.empty_like(dg) if gru else dg
        d_st = torch.empty_like(st) if lstm else dg
        flat = dg.new_empty(b, k * m) if need[7] else None   # dh_{t-1}, operand order
        bb, bj, _, nw = _decode_blocks(b, m, mi)
        _step_bwd[(_cdiv(b, bb), k * _cdiv(m, bj))](
            dg if d_out is None else d_out, *((0, 0) if d_out is None else d_out.stride()),
            dg if d_h is None else d_h, *((0, 0, 0) if d_h is None else d_h.stride()),
            dg if d_c is None else d_c, *((0, 0, 0) if d_c is None else d_c.stride()),
            acts, st, dg, dgh, d_st, dg if flat is None else flat, b,
            CELL=cell, K=k, M=m, SHUFFLE=shuffle, HAS_DOUT=d_out is not None,
            HAS_DH=d_h is not None, HAS_DC=d_c is not None, DIRECT=gru and flat is not None,
            BLOCK_B=bb, BLOCK_J=bj, OUT_SHUFFLE=ctx.out_shuffle, num_warps=nw)
        d_x = d_h_prev = d_w_ih = d_w_hh = d_b_ih = d_b_hh = None
        if need[2]:   # dx[:, k*mi + r] = sum_g dG[k, :, g] W_ih[k, g, r]
            d_x = x.new_empty(b, k * mi)
            torch.bmm(dg, w_ih, out=d_x.view(b, k, mi).transpose(0, 1))
        if flat is not None:   # the gradient of the operand, then of the units it read
            positions = flat.view(b, k, m).transpose(0, 1)
            if gru:
                positions.baddbmm_(dgh, w_hh)
            else:
                torch.bmm(dgh, w_hh, out=positions)
            # unit k*m + j <- operand position j*K + k
            d_h_prev = flat.view(b, m, k).permute(2, 0, 1) if shuffle else positions
        if ctx.grads is not None:  # the weight gradients: once for the whole sequence
            hand_over(ctx.grads, ctx.weights_node, dg, dgh if gru else None, x, operand)
            need = need[:3] + (False,) * 4 + need[7:]
        if need[3]:
            d_w_ih = torch.bmm(dg.transpose(1, 2), x.view(b, k, mi).transpose(0, 1))
        if need[5]:
            d_w_hh = torch.bmm(dgh.transpose(1, 2), operand)
        if need[4] or (need[6] and not gru):
            d_b_ih = dg.sum(1, dtype=torch.float32).to(dg.dtype)
        if need[6]:
            d_b_hh = dgh.sum(1, dtype=torch.float32).to(dg.dtype) if gru else d_b_ih
        grads = (None, None, None, d_x, d_w_ih, d_b_ih if need[4] else None, d_w_hh,
                 d_b_hh, d_h_prev)
        return grads + ((d_st if need[8] else None,) if lstm else ())


def step_triton_train(cell, x, state, weight_ih, bias_ih, weight_hh, bias_hh,
                      time_shuffle=False, out_shuffle=False, grads=None):
    """:func:`step_triton` with autograd (:class:`_TritonStep`); the arguments and results
    alike.  grads: the ``WeightGrads`` of weights from
    :func:`~grnn_fairseq.sequence_weights.sequence_weights`, or None (the weight gradients
    of every step computed, and summed by autograd)."""
    ty = weight_hh.dtype
    if cell not in GATES or ty not in SUPPORTED_DTYPES:
        _check(cell, ty)
    out, *new = _TritonStep.apply(cell, (bool(time_shuffle), bool(out_shuffle)), grads,
                                  x.to(ty), weight_ih, bias_ih, weight_hh, bias_hh,
                                  *(s.to(ty) for s in state))
    return out, tuple(new)


def kernel_signatures(dt, k, m, block_j=32):
    """The (kernel, pointer types, constexprs) of the forward scan, the backward scan and
    the (decoding or training) step in dtype ``dt`` ("bf16", "fp16", "fp32"), every
    feature on (shuffle, mask, training, output gradient, reverse), the default variant;
    for ahead-of-time compilation (:func:`compile_kernel`).  Add CELL (and change any
    constexpr) per use."""
    prec = "tf32" if dt == "fp32" else None
    blocks = dict(K=k, M=m, SHUFFLE=True, BLOCK_B=32, BLOCK_J=block_j, PRECISION=prec)
    fwd = (_scan_fwd,
           dict(gx_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", h_ptr="*fp32", c_ptr="*fp32",
                out_ptr=f"*{dt}", act_ptr="*fp32", mask_ptr="*i8", sync_ptr="*i32",
                err_ptr="*i32"),
           dict(blocks, HAS_MASK=True, SAVE=True, REVERSE=True, BLOCK_R=min(m, 64),
                POLL="atomic", RESIDENT=False))
    bwd = (_scan_bwd,
           dict(dg_ptr=f"*{dt}", dgx_ptr=f"*{dt}", w_ptr=f"*{dt}", act_ptr="*fp32",
                st_ptr="*fp32", dout_ptr=f"*{dt}", ph_ptr="*fp32", gc_ptr="*fp32",
                mask_ptr="*i8", dh0_ptr="*fp32", sync_ptr="*i32", err_ptr="*i32"),
           dict(blocks, HAS_MASK=True, HAS_DOUT=True, REVERSE=True, BLOCK_N=64, POLL="atomic"))
    step = (_decode_step,
            dict({p: f"*{dt}" for p in ("x_ptr", "wih_ptr", "bih_ptr", "whh_ptr", "bhh_ptr",
                                        "h_ptr", "c_ptr", "h_new_ptr", "c_new_ptr", "out_ptr",
                                        "op_ptr")},
                 act_ptr="*fp32"),
            dict(blocks, MI=m, BLOCK_R=min(m, 64), SAVE=True, OUT_SHUFFLE=True))
    return fwd, bwd, step


def step_backward_signature(dt, k, m, block_j=32):
    """(kernel, pointer types, constexprs) of the training step's backward
    (:func:`_step_bwd`), every output gradient present; add CELL."""
    return (_step_bwd,
            dict({p: f"*{dt}" for p in ("dout_ptr", "dh_ptr", "dc_ptr", "st_ptr", "dg_ptr",
                                        "dgh_ptr", "dst_ptr", "dhp_ptr")}, act_ptr="*fp32"),
            dict(K=k, M=m, SHUFFLE=True, HAS_DOUT=True, HAS_DH=True, HAS_DC=True,
                 DIRECT=True, BLOCK_B=32, BLOCK_J=block_j, OUT_SHUFFLE=True))


def compile_kernel(fn, ptrs, consts, arch=90, num_warps=4):
    """Compile one kernel ahead of time for a CUDA target (no GPU needed: Triton's bundled
    ptxas) -> Triton's compiled kernel (``.asm['cubin']``, ``.metadata.shared``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps))


def compile_check(arch=90, dtypes=("bf16", "fp32"), m=256, k=4):
    """Compile every kernel of every cell for a CUDA target, every feature on, the LSTM's
    scans in their other variants (VARIANT: polling by loads, resident weights, and the
    permuted W_hh columns: SHUFFLE 2), and every cell's training-step backward.
    Catches type, shape and lowering errors that the interpreter does not.  Returns the
    number compiled.  Run it without TRITON_INTERPRET (the interpreter replaces the
    kernels)."""
    n = 0
    for dt in dtypes:
        fwd, bwd, step = kernel_signatures(dt, k, m)
        jobs = [(fn, ptrs, dict(consts, CELL=cell)) for cell in CELLS
                for fn, ptrs, consts in (fwd, bwd, step, step_backward_signature(dt, k, m))]
        jobs += [(fwd[0], fwd[1], dict(fwd[2], CELL="lstm", POLL="load", RESIDENT=True,
                                       SHUFFLE=2, BLOCK_J=16, BLOCK_R=m)),
                 (bwd[0], bwd[1], dict(bwd[2], CELL="lstm", POLL="load", SHUFFLE=2))]
        for fn, ptrs, consts in jobs:
            compile_kernel(fn, ptrs, consts, arch)
            n += 1
    return n
