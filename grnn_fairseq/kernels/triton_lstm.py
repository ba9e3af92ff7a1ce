"""Group LSTM recurrence in Triton: forward and backward through time, fused per step.

Design
------
**One launch per time step** (forward and backward), the time loop in Python.  With the
time-step shuffle every group reads h_{t-1} of *every* group, so a step depends on the
whole previous step; keeping the loop inside one kernel would need a grid-wide barrier
per step (cooperative launch), which Triton does not offer portably and which would
deadlock under the interpreter.  Kernel boundaries are the barrier.  What each launch
fuses:

* forward (:func:`_lstm_fwd_step`), program = (batch tile, group k, tile of m units):
  the recurrent product of those units' four gate rows with h_{t-1} **read through the
  shuffle index** (``src = (q % K) * m + q // K`` computed in the kernel; no permuted copy
  of h is ever made), + the input projection gx[t] and b_hh, the gate non-linearities,
  c_t, h_t, the padding mask (padded steps keep the state and output zeros), and the
  stores: output h_t, states (h_t, c_t) and, for training, the activations.
* backward (:func:`_lstm_bwd_step`), program = (batch tile, group k, tile of m operand
  positions q): the product dG_{t+1}[k] W_hh[k] for those positions (the gradient of
  the shuffled operand), mapped back to the units that fed them (``u = src(q)``), then
  the LSTM backward at time t for exactly those units: gate gradients dG_t, the carried
  dc, and the pass-through gradients of padded steps.  Each unit is owned by one program,
  so the in-place updates of the carried gradients are race free.
  A last launch (``DO_CELL=False``) turns dG_0 W_hh into dh_0.

The large products without a sequential dependency stay in cuBLAS: the input projection
(``engine.project_input``) and dW_hh = sum_t dG_t^T h_in_t (one batched product after the
loop; h_in_t = the states gathered in shuffled order).

States and carried gradients are fp32 buffers whatever the input dtype; products take
their operands in the weights' dtype (bf16/fp16 tensor cores, or fp32 with TF32 exactly
when ``torch.backends.cuda.matmul.allow_tf32`` allows it) and accumulate in fp32.

Recompilation: T, B, the time index and the slot indices are runtime arguments excluded
from Triton's integer specialisation, so neither the batch size nor the sequence length
recompiles; the block sizes come from a few buckets of (B, m).  Variants are compiled per
(dtype, m, K, shuffle, mask, training) only.

Not tuned on a GPU yet (block sizes and warps are reasonable defaults; see
scripts/bench_layer.py --device cuda).  Tested through Triton's interpreter
(``TRITON_INTERPRET=1``) against the reference engine (tests/test_triton_engine.py).
"""
import torch
import triton
import triton.language as tl

_RUNTIME = ["t", "h_in", "h_out", "c_in", "c_out", "B", "T",
            "stride_gx_t", "stride_gx_k", "stride_gx_b"]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit(do_not_specialize=_RUNTIME)
def _lstm_fwd_step(
    gx_ptr, stride_gx_t, stride_gx_k, stride_gx_b,
    w_ptr, b_ptr, h_ptr, c_ptr, out_ptr, act_ptr, mask_ptr,
    t, h_in, h_out, c_in, c_out, B, T,
    K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    H = K * M
    G = 4 * M
    pid_b = tl.program_id(0)
    pid_u = tl.program_id(1)
    n_jt = (M + BLOCK_J - 1) // BLOCK_J
    k = pid_u // n_jt
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = (pid_u % n_jt) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_b = offs_b < B
    mask_j = offs_j < M
    row_b = offs_b.to(tl.int64) * H

    acc_i = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    w_base = w_ptr + k.to(tl.int64) * G * M
    h_base = h_ptr + h_in.to(tl.int64) * B * H
    for r0 in range(0, M, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < M
        q = k * M + offs_r                       # operand position (shuffled order)
        if SHUFFLE:
            src = (q % K) * M + q // K           # the unit the shuffle puts at q
        else:
            src = q
        hp = tl.load(h_base + row_b[:, None] + src[None, :],
                     mask=mask_b[:, None] & mask_r[None, :], other=0.0)
        hp = hp.to(w_ptr.dtype.element_ty)
        w_off = offs_j[None, :] * M + offs_r[:, None]     # W_hh[k, gate*M + j, r] as [r, j]
        w_mask = mask_r[:, None] & mask_j[None, :]
        acc_i += tl.dot(hp, tl.load(w_base + w_off, mask=w_mask, other=0.0),
                        input_precision=PRECISION)
        acc_f += tl.dot(hp, tl.load(w_base + M * M + w_off, mask=w_mask, other=0.0),
                        input_precision=PRECISION)
        acc_g += tl.dot(hp, tl.load(w_base + 2 * M * M + w_off, mask=w_mask, other=0.0),
                        input_precision=PRECISION)
        acc_o += tl.dot(hp, tl.load(w_base + 3 * M * M + w_off, mask=w_mask, other=0.0),
                        input_precision=PRECISION)

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
    c_prev = tl.load(c_ptr + c_in.to(tl.int64) * B * H + unit, mask=bm, other=0.0)
    c_new = f * c_prev + i * g
    h_new = o * _tanh(c_new)
    if HAS_MASK:
        keep = tl.load(mask_ptr + t * B + offs_b, mask=mask_b, other=0) != 0
        keep = keep[:, None]
        h_prev = tl.load(h_base + unit, mask=bm, other=0.0)
        h_state = tl.where(keep, h_new, h_prev)
        c_state = tl.where(keep, c_new, c_prev)
        h_emit = tl.where(keep, h_new, 0.0)
    else:
        h_state = h_new
        c_state = c_new
        h_emit = h_new
    tl.store(h_ptr + h_out.to(tl.int64) * B * H + unit, h_state, mask=bm)
    tl.store(c_ptr + c_out.to(tl.int64) * B * H + unit, c_state, mask=bm)
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


@triton.jit(do_not_specialize=["t", "t_next", "n_red", "c_in", "c_out", "B", "T",
                               "stride_do_t", "stride_do_b", "stride_do_u"])
def _lstm_bwd_step(
    dg_ptr, w_ptr, act_ptr, c_ptr, dout_ptr, stride_do_t, stride_do_b, stride_do_u,
    ph_ptr, gc_ptr, mask_ptr, dh0_ptr,
    t, t_next, n_red, c_in, c_out, B, T,
    K: tl.constexpr, M: tl.constexpr,
    SHUFFLE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOUT: tl.constexpr,
    DO_CELL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    H = K * M
    G = 4 * M
    pid_b = tl.program_id(0)
    pid_u = tl.program_id(1)
    n_jt = (M + BLOCK_J - 1) // BLOCK_J
    k = pid_u // n_jt
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = (pid_u % n_jt) * BLOCK_J + tl.arange(0, BLOCK_J)   # operand positions in group k
    mask_b = offs_b < B
    mask_j = offs_j < M
    offs_b64 = offs_b.to(tl.int64)

    # gradient of the operand h_in[k, :, j] of the step processed before (time t_next):
    # dG_{t_next}[k] @ W_hh[k]   (n_red = 0 at the first processed step: no such step)
    acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    dg_next = dg_ptr + ((k.to(tl.int64) * T + t_next) * B + offs_b64)[:, None] * G
    w_base = w_ptr + k.to(tl.int64) * G * M
    for n0 in range(0, n_red, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < G
        a = tl.load(dg_next + offs_n[None, :], mask=mask_b[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_base + offs_n[:, None] * M + offs_j[None, :],
                    mask=mask_n[:, None] & mask_j[None, :], other=0.0)
        acc += tl.dot(a.to(w_ptr.dtype.element_ty), w, input_precision=PRECISION)

    q = k * M + offs_j
    if SHUFFLE:
        u = (q % K) * M + q // K       # the unit read at operand position q
    else:
        u = q
    bm = mask_b[:, None] & mask_j[None, :]
    unit = offs_b64[:, None] * H + u[None, :]
    s_h = acc + tl.load(ph_ptr + unit, mask=bm, other=0.0)   # gradient of the state h_t
    if DO_CELL:
        ku = u // M
        ju = u % M
        a_base = (act_ptr + ((ku.to(tl.int64)[None, :] * T + t) * B + offs_b64[:, None]) * G
                  + ju[None, :])
        i = tl.load(a_base, mask=bm, other=0.0)
        f = tl.load(a_base + M, mask=bm, other=0.0)
        g = tl.load(a_base + 2 * M, mask=bm, other=0.0)
        o = tl.load(a_base + 3 * M, mask=bm, other=0.0)
        c_prev = tl.load(c_ptr + c_in.to(tl.int64) * B * H + unit, mask=bm, other=0.0)
        c_now = tl.load(c_ptr + c_out.to(tl.int64) * B * H + unit, mask=bm, other=0.0)
        gc = tl.load(gc_ptr + unit, mask=bm, other=0.0)
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


# --------------------------------------------------------------------------- host side
def _pow2(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(int(n))))


def _blocks(b, m):
    """(BLOCK_B, BLOCK_J, BLOCK_R) from a few buckets of the batch and group widths."""
    return _pow2(b, 16, 32), _pow2(m, 16, 32), _pow2(m, 16, 64)


def _precision(dtype):
    """tl.dot's input precision: only fp32 operands have a choice (TF32 iff torch allows it)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


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
    slot = (lambda s: s) if save else (lambda s: s % 2)
    hs = gx.new_empty(n_slots, b, width, dtype=torch.float32)
    cs = gx.new_empty(n_slots, b, width, dtype=torch.float32)
    first = t_len + 1 if reverse else 0
    last = 1 if reverse else t_len
    hs[slot(first)] = _flat(h0)
    cs[slot(first)] = _flat(c0)
    out = gx.new_empty(t_len, b, width)
    acts = gx.new_empty(k, t_len, b, gm, dtype=torch.float32) if save else out
    mask8 = mask.to(torch.int8).contiguous() if mask is not None else out
    bb, bj, br = _blocks(b, m)
    grid = (triton.cdiv(b, bb), k * triton.cdiv(m, bj))
    for step in range(t_len):
        t = t_len - 1 - step if reverse else step
        s_in, s_out = (t + 2, t + 1) if reverse else (t, t + 1)
        _lstm_fwd_step[grid](
            gx, gx.stride(0), gx.stride(1), gx.stride(2),
            w, bias, hs, cs, out, acts, mask8,
            t, slot(s_in), slot(s_out), slot(s_in), slot(s_out), b, t_len,
            K=k, M=m, SHUFFLE=bool(time_shuffle), HAS_MASK=mask is not None, SAVE=save,
            BLOCK_B=bb, BLOCK_J=bj, BLOCK_R=br, PRECISION=_precision(w.dtype),
            num_warps=4,
        )
    h_t = _grouped(hs[slot(last)], k, gx.dtype)
    c_t = _grouped(cs[slot(last)], k, gx.dtype)
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
    bb, bj, _ = _blocks(b, m)
    bn = _pow2(gm, 16, 64)
    grid = (triton.cdiv(b, bb), k * triton.cdiv(m, bj))
    common = dict(K=k, M=m, SHUFFLE=bool(time_shuffle), HAS_MASK=mask is not None,
                  HAS_DOUT=has_dout, BLOCK_B=bb, BLOCK_J=bj, BLOCK_N=bn,
                  PRECISION=_precision(w.dtype), num_warps=4)
    t_next = 0
    for step in range(t_len):
        t = step if reverse else t_len - 1 - step
        c_in = t + 2 if reverse else t
        _lstm_bwd_step[grid](
            dg, w, acts, cs, d_out, *strides, ph, gc, mask8, dh0,
            t, t_next, 0 if step == 0 else gm, c_in, t + 1, b, t_len,
            DO_CELL=True, **common)
        t_next = t
    _lstm_bwd_step[grid](
        dg, w, acts, cs, d_out, *strides, ph, gc, mask8, dh0,
        0, t_next, gm, 0, 0, b, t_len, DO_CELL=False, **common)
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


def compile_check(arch=90, dtypes=("bf16", "fp32"), m=256, k=4):
    """Compile the kernels ahead of time for a CUDA target (no GPU needed: Triton's bundled
    ptxas), every feature on (shuffle, mask, training, output gradient).  Catches type,
    shape and lowering errors that the interpreter does not.  Returns the number compiled.
    Run it without TRITON_INTERPRET (the interpreter replaces the kernels)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    n = 0
    for dt in dtypes:
        prec = "tf32" if dt == "fp32" else None
        for fn, ptrs, consts in (
            (_lstm_fwd_step,
             dict(gx_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", h_ptr="*fp32", c_ptr="*fp32",
                  out_ptr=f"*{dt}", act_ptr="*fp32", mask_ptr="*i8"),
             dict(K=k, M=m, SHUFFLE=True, HAS_MASK=True, SAVE=True, BLOCK_B=32, BLOCK_J=32,
                  BLOCK_R=64, PRECISION=prec)),
            (_lstm_bwd_step,
             dict(dg_ptr=f"*{dt}", w_ptr=f"*{dt}", act_ptr="*fp32", c_ptr="*fp32",
                  dout_ptr=f"*{dt}", ph_ptr="*fp32", gc_ptr="*fp32", mask_ptr="*i8",
                  dh0_ptr="*fp32"),
             dict(K=k, M=m, SHUFFLE=True, HAS_MASK=True, HAS_DOUT=True, DO_CELL=True,
                  BLOCK_B=32, BLOCK_J=32, BLOCK_N=64, PRECISION=prec)),
        ):
            sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}
            triton.compile(ASTSource(fn, sig, consts), target=target, options=dict(num_warps=4))
            n += 1
    return n
