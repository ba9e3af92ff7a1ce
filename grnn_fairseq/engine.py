"""Recurrence engines: the time loop over canonical grouped weights.

Four backends run :func:`scan` (chosen per call by :func:`resolve_backend`):

``reference``
    The plain loop in PyTorch with autograd through every step.  It is the definition:
    every other backend is tested against it, and it runs every cell (LSTM, GRU, RNN).
``torch``
    The LSTM as one autograd node over the whole sequence (:class:`LSTMScan`): the forward
    loop runs without autograd on preallocated buffers, and the backward through time is
    written by hand.  The fallback on CPU.
``cpp``
    The same node with both loops in C++ (:mod:`grnn_fairseq.kernels.cpu_rnn`, compiled
    just in time at first use; needs a C++ compiler and ``ninja``), for the LSTM, the GRU
    and the Elman RNN: per step one batched product and one fused, vectorised and threaded
    pointwise pass; in fp32 the forward step is one pass (product in registers, cell on
    it at once).  Where oneDNN computes a layer's input projection, projection and loop are
    one node (:func:`project_scan`, :class:`CppProjectedScan`).  fp32 and fp64 (other
    dtypes: ``torch`` for the LSTM, ``reference`` for the others).  A decoder's training
    steps (weights from :func:`step_weights`) are :class:`CppTrainStep`: the weight
    gradients once per sequence.  Default on CPU when it builds.
``triton``
    Fused Triton kernels for every cell (:mod:`grnn_fairseq.kernels.triton_rnn`):
    one persistent launch per sequence (a grid-wide barrier between time steps) that fuses
    the recurrent product, the time-step shuffle (read through the permuted index) and
    the pointwise cell; decoding steps are one launch per layer (:func:`fused_step`), and
    so are steps with autograd where GRNN_TRITON_TRAIN_STEP=1 (plus their backward).
    Default for CUDA tensors when Triton is importable.

``auto`` (the default) picks ``triton`` for CUDA tensors when Triton is available; on the
CPU ``cpp`` for fp32 / fp64 tensors when the extension builds (a failed build warns once
and falls back), else ``torch`` for the LSTM.  A cell that a backend does not cover runs
on ``reference`` (``torch`` covers the LSTM only).  Force a backend with the ``backend=``
argument or the environment variable
``GRNN_BACKEND=reference|torch|cpp|triton|auto`` (the argument wins).

Efficiency rules of the reference loop (shared by the others):

* the input projection of all T steps is one batched product, outside the loop
  (:func:`project_input`);
* the recurrent step is one batched product over the K groups (``torch.baddbmm`` on
  [K, B, m] x [K, m, G*m]);
* steps are visited with ``unbind`` and collected with ``stack``, so the backward pass
  allocates no full-size tensor per step.
"""
import functools
import os

import torch

from .cells import POINTWISE
from .errors import ConfigError
from .kernels import onednn
from .rearrangement import rearrange_grouped
from .sequence_weights import hand_over, sequence_weights

BACKENDS = ("auto", "reference", "torch", "cpp", "triton")
CELLS = {"torch": ("lstm",),                # the cells each backend covers
         "cpp": ("lstm", "gru", "rnn"),
         "triton": ("lstm", "gru", "rnn")}
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPP_DTYPES = (torch.float32, torch.float64)


def project_input(x, weight_ih, bias_ih):
    """Input projections of every position at once.

    x: [N, I]  weight_ih: [K, G*m, I/K]  bias_ih: [K, G*m]  ->  [K, N, G*m]
    K = 1 with autograd also takes the batched product (of one): its weight gradient is
    [1, G*m, I] as it is, where selecting the matrix would zero-fill and copy the whole
    weight in the backward, once per target position of a decoder trained step by step
    (results/cpu_projection_ab.txt).  Large fp32 products on the CPU go through oneDNN
    (:mod:`grnn_fairseq.kernels.onednn`, $GRNN_CPU_GEMM).
    """
    if onednn.wanted(x, weight_ih):
        return onednn.grouped_linear(x, weight_ih, bias_ih)
    return _project_blas(x, weight_ih, bias_ih)


def _project_blas(x, weight_ih, bias_ih=None):
    """:func:`project_input` by PyTorch's products (oneDNN already declined); without
    ``bias_ih`` the bare products.  That is for the C++ scan of the LSTM and the Elman RNN,
    whose gates add the input and recurrent biases alike (b_ih + b_hh, one [K, G*m] sum):
    MKL adds a bias by first copying it into every row of the result (``baddbmm``'s beta
    = 1), a pass over all T*B*G*m outputs that took 5.5 ms of a 35 ms forward of the
    issue's 4-group layer on an Intel Xeon, and its gradient is a sum over those rows; the
    C++ loop adds the summed bias as it reads the row anyway, and its bias gradient serves
    both.  Not the GRU: its candidate's recurrent bias is gated."""
    k = weight_ih.shape[0]
    if k == 1 and not (weight_ih.requires_grad and torch.is_grad_enabled()):
        w = weight_ih[0].t()
        y = torch.mm(x, w) if bias_ih is None else torch.addmm(bias_ih[0], x, w)
        return y.unsqueeze(0)
    xk = x.view(x.shape[0], k, -1).transpose(0, 1)  # [K, N, I/K]
    if bias_ih is None:
        return torch.bmm(xk, weight_ih.transpose(1, 2))
    return torch.baddbmm(bias_ih.unsqueeze(1), xk, weight_ih.transpose(1, 2))


def recurrent_step(gx_t, state, weight_hh_t, bias_hh, cell, time_shuffle, backend=None):
    """One step of the recurrence for every group.

    gx_t: [K, B, G*m]  state: tuple of [K, B, m]  weight_hh_t: [K, m, G*m] (transposed)
    bias_hh: [K, 1, G*m]  ->  (h_t [K, B, m], new state tuple)
    Without autograd (decoding) and unless the backend resolves to ``reference``, the LSTM
    takes an in-place path (the fused C++ step where ``cpp`` is asked for by name), the GRU
    and RNN on CPU the C++ step where the backend resolves to ``cpp``; on ``triton`` a
    layer's decoding step goes through :func:`fused_step` instead.  With autograd (a
    decoder trained step by step) on backend ``cpp`` and K > 1, every cell runs as the C++
    scan of one step, which has its own backward.
    """
    amp = autocast_dtype(gx_t.device.type)
    if amp is not None:
        with torch.autocast(gx_t.device.type, enabled=False):
            return recurrent_step(gx_t.to(amp), tuple(s.to(amp) for s in state),
                                  weight_hh_t.to(amp), bias_hh.to(amp), cell, time_shuffle,
                                  backend)
    name = backend or os.environ.get("GRNN_BACKEND") or "auto"
    grad = torch.is_grad_enabled() and _any_requires_grad(gx_t, *state, weight_hh_t, bias_hh)
    if grad and gx_t.shape[0] > 1 and name != "reference" and gx_t.device.type == "cpu" and resolve_backend(
            name, cell, gx_t.device, gx_t.dtype) == "cpp":
        # a training step of a group layer (RNNSearch's decoder runs step by step); K = 1
        # keeps torch's ops, where one large product dominates (cpu_training_step_ab.txt)
        return _step_cpp_scan(cell, gx_t, state, weight_hh_t, bias_hh, time_shuffle)
    if name != "reference" and not grad:
        def on_cpp():
            return gx_t.device.type == "cpu" and resolve_backend(
                name, cell, gx_t.device, gx_t.dtype) == "cpp"

        if cell == "lstm":
            # single steps: the in-place torch step is the default (on 2 threads it measured
            # faster than the fused C++ step: scripts/bench_layer.py --modes decode); 'cpp'
            # forced by name takes the C++ step
            if name == "cpp" and on_cpp():
                return _step_cpp(cell, gx_t, state, weight_hh_t, bias_hh, time_shuffle)
            return _lstm_step_nograd(gx_t, state, weight_hh_t, bias_hh, time_shuffle)
        if on_cpp():  # GRU / RNN: the C++ step, 1.1-1.5x the reference step at K = 4-16
            return _step_cpp(cell, gx_t, state, weight_hh_t, bias_hh, time_shuffle)
    h_prev = rearrange_grouped(state[0]) if time_shuffle else state[0]
    gh = torch.baddbmm(bias_hh, h_prev, weight_hh_t)
    return POINTWISE[cell](gx_t, gh, state)


class StepWeights(tuple):
    """A layer's (w_ih, w_hh, b_ih, b_hh) for the training steps of one sequence, with
    ``grads``, the :class:`~grnn_fairseq.sequence_weights.WeightGrads` its steps fill, and
    ``engine``, the backend whose steps fill it, ``cpp`` or ``triton`` (see
    :func:`step_weights`)."""

    grads = None
    engine = None


def step_weights(weights, cell, backend=None):
    """A layer's assembled weights (w_ih, w_hh, b_ih, b_hh), for the steps of one
    sequence.  Where those steps are training steps that hand their weight gradients over
    (:class:`CppTrainStep`: backend ``cpp``; :func:`fused_step` with autograd:
    backend ``triton`` with GRNN_TRITON_TRAIN_STEP=1), a :class:`StepWeights` whose
    weight gradients are computed once for the whole sequence rather than per step and
    summed (:class:`~grnn_fairseq.sequence_weights.SequenceWeights`); otherwise the
    weights as they are."""
    w_hh = weights[1]
    # decoding first (no autograd): it asks once per token and layer
    if not torch.is_grad_enabled() or not _any_requires_grad(*weights):
        return weights
    device = w_hh.device
    amp = autocast_dtype(device.type)
    dtype = amp if amp is not None else w_hh.dtype
    name = resolve_backend(backend, cell, device, dtype)
    if name == "triton":
        from .kernels import triton_rnn

        if not triton_rnn.train_step_on():
            return weights
    elif name != "cpp" or amp is not None:
        return weights
    assembled, grads = sequence_weights(cell, dtype, *weights)
    out = StepWeights(assembled)
    out.grads, out.engine = grads, name
    return out


class CppTrainStep(torch.autograd.Function):
    """One training step of one layer on the CPU (RNNSearch's decoder, trained
    position by position; backend ``cpp``, any K), with the weight gradients handed over
    to the sequence (:mod:`grnn_fairseq.sequence_weights`).  Forward: the input projection
    (:func:`project_input`) and the C++ step of the cell.  Backward: the C++ backward of
    the cell, without its weight gradient; dx = dG W_ih per group; and dG, x and the
    operand h'_{t-1} given to the sequence's ``WeightGrads``.  The step before (the C++
    scan of one step; at K = 1 torch's ops) computed its weight gradients, which autograd
    added up: T additions of weight-sized tensors per layer.  A decoder of two LSTM layers
    trains 1.1-1.3x faster at IWSLT sizes, 1.6-1.7x at WMT sizes
    (results/cpu_sequence_weights_ab.txt)."""

    @staticmethod
    def forward(ctx, cell, time_shuffle, grads, x, w_ih, b_ih, w_hh, b_hh, *state):
        gx = project_input(x, w_ih, b_ih)
        out, final, fac, hs = _cpp_forward(cell, gx.unsqueeze(0), state, w_hh, b_hh, None,
                                           time_shuffle, False, True)
        ctx.save_for_backward(x, w_ih, w_hh, hs)
        ctx.fac, ctx.cell, ctx.time_shuffle, ctx.grads = fac, cell, time_shuffle, grads
        ctx.weights_node = w_ih.grad_fn  # SequenceWeights' node, which the backward asks about
        return (out[0],) + final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_h, d_c=None):
        from .kernels import cpu_rnn

        x, w_ih, w_hh, hs = ctx.saved_tensors
        k, _, mi = w_ih.shape
        b, m = x.shape[0], w_hh.shape[-1]
        d_gx, d_h0, d_c0, dgh, _ = cpu_rnn.load().backward(
            ctx.fac, hs, w_hh, None, d_out.unsqueeze(0), d_h, d_c, ctx.time_shuffle, False,
            cpu_rnn.CELL_IDS[ctx.cell], False)
        dg = d_gx[0]  # [K, B, G*m]; the GRU's input side (dgh: its hidden side)
        d_x = None
        if ctx.needs_input_grad[3] and onednn.wanted(x, w_ih):
            d_x = onednn.input_grad(dg.contiguous(), w_ih)
        elif ctx.needs_input_grad[3]:  # dx[:, k*mi + r] = sum_g dG[k, :, g] W_ih[k, g, r]
            d_x = torch.bmm(dg, w_ih).transpose(0, 1).reshape(b, k * mi)
        operand = hs[0].view(b, k, m).transpose(0, 1)  # h'_{t-1} as the product read it
        hand_over(ctx.grads, ctx.weights_node, dg, dgh if ctx.cell == "gru" else None, x,
                  operand)
        d_state = (d_h0, d_c0) if ctx.cell == "lstm" else (d_h0,)
        return (None, None, None, d_x, None, None, None, None) + d_state


def cpp_train_step(x_t, state, w_ih, b_ih, w_hh, b_hh, cell, time_shuffle, grads):
    """A training step of one layer through :class:`CppTrainStep`, for weights from
    :func:`step_weights` (``engine`` ``cpp``).  x_t: [B, I]; state: tuple of [K, B, m]
    -> (h_t [K, B, m], new state), as :func:`recurrent_step`."""
    k, b = w_ih.shape[0], x_t.shape[0]
    out, *final = CppTrainStep.apply(cell, bool(time_shuffle), grads, x_t, w_ih, b_ih, w_hh,
                                     b_hh, *state)
    return out.view(b, k, -1).transpose(0, 1), tuple(final)


def fused_step(x_t, state, weight_ih, bias_ih, weight_hh, bias_hh, cell, time_shuffle,
               backend=None, grads=None, out_shuffle=False):
    """One step of a whole layer in one launch (input projection, recurrence and cell
    fused), on the ``triton`` backend: every cell without autograd (decoding); with
    autograd where GRNN_TRITON_TRAIN_STEP=1
    (:class:`~grnn_fairseq.kernels.triton_rnn._TritonStep`: its backward is one launch for
    the cell and the products with the weights).  x_t: [B, I]; state: tuple of [K, B, m];
    weights as in :func:`project_input` and :func:`scan`; grads: the ``grads`` of the
    :class:`StepWeights` they came from, or None; out_shuffle: out in the order of the
    rearrangement between layers (written so by the kernel: no copy).  -> (out [B, K*m],
    new state), or None (then use project_input + recurrent_step)."""
    # cheapest tests first: on CPU this runs once per layer and token, and returns None
    if cell not in CELLS["triton"] or (x_t.device.type != "cuda" and not _interpreting()):
        return None
    grad = torch.is_grad_enabled() and _any_requires_grad(
        x_t, *state, weight_ih, bias_ih, weight_hh, bias_hh)
    if grad:   # the variant first: with it off (the default) a training step costs no more
        from .kernels import triton_rnn
        if not triton_rnn.train_step_on():
            return None
    amp = autocast_dtype(x_t.device.type)
    dtype = amp if amp is not None else weight_hh.dtype
    if resolve_backend(backend, cell, x_t.device, dtype) != "triton":
        return None
    from .kernels import triton_rnn

    step = triton_rnn.step_triton_train if grad else triton_rnn.step_triton
    extra = {"grads": grads} if grad else {}
    if amp is None:  # the common case, kept cheap: this runs once per layer and token
        return step(cell, x_t, state, weight_ih, bias_ih, weight_hh, bias_hh, time_shuffle,
                    out_shuffle, **extra)
    with torch.autocast(x_t.device.type, enabled=False):
        return step(cell, x_t.to(amp), tuple(s.to(amp) for s in state),
                    *(t.to(amp) for t in (weight_ih, bias_ih, weight_hh, bias_hh)),
                    time_shuffle, out_shuffle, **extra)


def _any_requires_grad(*tensors):
    return any(t.requires_grad for t in tensors)


def _lstm_step_nograd(gx_t, state, weight_hh_t, bias_hh, time_shuffle):
    """``recurrent_step`` for the LSTM without autograd (decoding): in-place gate math on
    one fresh buffer, tanh computed as 2 sigmoid(2x) - 1 (see ``_gate_scale``)."""
    h_prev, c_prev = state
    m = h_prev.shape[-1]
    if time_shuffle:
        h_prev = rearrange_grouped(h_prev)
    gates = torch.baddbmm(bias_hh, h_prev, weight_hh_t)
    gates += gx_t
    gates[..., 2 * m:3 * m] *= 2
    gates.sigmoid_()
    i, f, g, o = gates.split(m, -1)
    g.mul_(2).sub_(1)
    c = f * c_prev
    c.addcmul_(i, g)
    h = _tanh_via_sigmoid(c, torch.empty_like(c))
    h *= o
    return h, (h, c)


def _step_cpp_scan(cell, gx_t, state, weight_hh_t, bias_hh, time_shuffle):
    """``recurrent_step`` with autograd, as the C++ scan of one step: one autograd node with
    its own backward instead of a dozen small ops each way (1.2x at K = 16, even at K = 4:
    results/cpu_training_step_ab.txt)."""
    out, final = scan_cpp(cell, gx_t.unsqueeze(0), state, weight_hh_t.transpose(1, 2),
                          bias_hh.view(gx_t.shape[0], -1), None, time_shuffle, False)
    return out[0], final


def _step_cpp(cell, gx_t, state, weight_hh_t, bias_hh, time_shuffle):
    """``recurrent_step`` without autograd, through the C++ loop (T=1)."""
    k = state[0].shape[0]
    with torch.no_grad():
        _, final, _, _ = _cpp_forward(cell, gx_t.unsqueeze(0), state,
                                      weight_hh_t.transpose(1, 2), bias_hh.view(k, -1), None,
                                      time_shuffle, False, False)
    return final[0], final


# --------------------------------------------------------------------------- dispatch
def autocast_dtype(device_type):
    """The dtype autocast computes in on ``device_type`` ('cpu' / 'cuda'), or None when
    autocast is off there."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        on = (torch.is_autocast_cpu_enabled() if device_type == "cpu"
              else torch.is_autocast_enabled())
        if not on:
            return None
        return (torch.get_autocast_cpu_dtype() if device_type == "cpu"
                else torch.get_autocast_gpu_dtype())
    return torch.get_autocast_dtype(device_type) if on else None


@functools.lru_cache(maxsize=None)
def triton_available():
    """True when the Triton kernels can be imported (Triton installed and working)."""
    try:
        from .kernels import triton_rnn  # noqa: F401
    except Exception:  # not installed, or an installation that fails at import
        return False
    return True


def cpp_available():
    """True when the fused CPU loops (backend ``cpp``) build and load.  Built at the first
    call, then cached; a failure warns once and returns False."""
    from .kernels import cpu_rnn

    return cpu_rnn.available()


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _chosen(backend, name):
    """How the user chose backend ``name``, for messages: the argument or $GRNN_BACKEND."""
    return f"backend={name!r}" if backend else f"GRNN_BACKEND={name}"


def resolve_backend(backend, cell, device, dtype=None):
    """The backend that runs ``cell`` on ``device``: ``backend`` (or $GRNN_BACKEND, or
    ``auto``) resolved to ``reference``, ``torch``, ``cpp`` or ``triton``."""
    name = backend or os.environ.get("GRNN_BACKEND") or "auto"
    if name not in BACKENDS:
        raise ConfigError(f"{_chosen(backend, name)} is not a recurrence backend; use one of "
                          f"{BACKENDS} (argument backend= or environment variable GRNN_BACKEND)")
    fallback = "torch" if cell in CELLS["torch"] else "reference"
    if name == "auto":
        if (device.type == "cuda" and cell in CELLS["triton"] and dtype in TRITON_DTYPES
                and triton_available()):
            return "triton"
        if (device.type == "cpu" and cell in CELLS["cpp"] and dtype in CPP_DTYPES
                and cpp_available()):
            return "cpp"
        return fallback
    if name != "reference" and cell not in CELLS[name]:
        return "reference"
    if name == "cpp":
        if device.type != "cpu":
            raise ConfigError(f"{_chosen(backend, name)}: the C++ backend runs on CPU tensors "
                              f"(got {device.type}); use 'triton' or 'torch' on the GPU, or "
                              "leave it unset ('auto' picks the backend of each device)")
        if dtype is not None and dtype not in CPP_DTYPES:
            return fallback  # the C++ loops cover fp32 / fp64
        from .kernels import cpu_rnn

        cpu_rnn.load()  # a RuntimeError naming the cause and the fix if it cannot build
    if name == "triton":
        if not triton_available():
            raise ConfigError(f"{_chosen(backend, name)}: needs Triton: pip install triton, "
                              "or leave the backend unset ('auto')")
        if device.type != "cuda" and not _interpreting():
            raise ConfigError(f"{_chosen(backend, name)}: the Triton backend runs on CUDA "
                              f"tensors (got {device.type}); leave it unset ('auto' picks the "
                              "C++ or torch backend on CPU), or set TRITON_INTERPRET=1 to run "
                              "it through Triton's interpreter")
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports {TRITON_DTYPES}, got {dtype}")
    return name


def scan(gx, state, weight_hh, bias_hh, cell, time_shuffle=False, mask=None, reverse=False,
         backend=None):
    """Run the recurrence over T steps.

    gx: [T, K, B, G*m] input projections (bias included)   state: tuple of [K, B, m]
    weight_hh: [K, G*m, m]   bias_hh: [K, G*m]   mask: [T, B] bool, True at real tokens
    (None: no padding)   reverse: visit t = T-1 .. 0.   backend: see :func:`resolve_backend`.
    Returns (out [T, K, B, m], final state).  Padded steps keep the state unchanged and
    output zeros, so padding on either side never changes the results of real tokens.
    Under autocast (fairseq's --amp) the recurrence runs in autocast's dtype, as
    torch.nn.LSTM does: every operand is cast to it and autocast is off inside.
    """
    amp = autocast_dtype(gx.device.type)
    if amp is not None:
        with torch.autocast(gx.device.type, enabled=False):
            return scan(gx.to(amp), tuple(s.to(amp) for s in state), weight_hh.to(amp),
                        bias_hh.to(amp), cell, time_shuffle, mask, reverse, backend)
    name = resolve_backend(backend, cell, gx.device, gx.dtype)
    if name == "reference":
        return scan_reference(gx, state, weight_hh, bias_hh, cell, time_shuffle, mask, reverse)
    if name == "triton":
        from .kernels.triton_rnn import scan_triton
        return scan_triton(cell, gx, state, weight_hh, bias_hh, mask, time_shuffle, reverse)
    if name == "cpp":
        return scan_cpp(cell, gx, state, weight_hh, bias_hh, mask, time_shuffle, reverse)
    return lstm_scan_torch(gx, state[0], state[1], weight_hh, bias_hh, mask, time_shuffle, reverse)


def scan_reference(gx, state, weight_hh, bias_hh, cell, time_shuffle=False, mask=None,
                   reverse=False):
    """The reference loop (arguments and results as :func:`scan`)."""
    w_t = weight_hh.transpose(1, 2)
    b = bias_hh.unsqueeze(1)
    steps = gx.unbind(0)
    masks = mask.unsqueeze(-1).unbind(0) if mask is not None else None  # each [B, 1]
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    outs = [None] * len(steps)
    for t in order:
        h_prev = rearrange_grouped(state[0]) if time_shuffle else state[0]
        h, new_state = POINTWISE[cell](steps[t], torch.baddbmm(b, h_prev, w_t), state)
        if masks is not None:
            keep = masks[t]
            new_state = tuple(torch.where(keep, n, s) for n, s in zip(new_state, state))
            h = h * keep
        state = new_state
        outs[t] = h
    return torch.stack(outs), state


# --------------------------------------------------------------------------- torch LSTM
# Layout.  Per step, the states of a batch are *flat* [B, H] buffers (H = K*m); their
# grouped [K, B, m] views (``_grouped``) are what the batched products and the pointwise
# ops read and write, with unit stride along m.  With the time-step shuffle, h_t exists in
# two channel orders: unit order (the cell's output) and shuffled order (the operand of the
# next product, ``rearrange``'s order); one ``index_select`` over the flat [B, H] buffer
# maps one to the other (contiguous rows, a precomputed index; much faster than writing
# through a strided transposed view).  Gradients go back through the inverse index.
def _grouped(buf, k):
    """[B, H] (or [T, B, H]) -> [K, B, m] (or [K, T, B, m]) strided view."""
    *lead, h = buf.shape
    return buf.view(*lead, k, h // k).movedim(-2, 0)


def _shuffle_index(width, k, device, inverse=False):
    """Index p with rearrange(x)[..., q] = x[..., p[q]] (or the inverse permutation)."""
    p = torch.arange(width, device=device).view(k, width // k).t().reshape(-1)
    return torch.argsort(p) if inverse else p


def _gate_scale(bias_hh, m):
    """[4m] = (1, 1, 2, 1) per gate: the g gate is computed as tanh(x) = 2 sigmoid(2x) - 1,
    so one sigmoid covers all four gates (torch's CPU tanh is several times slower)."""
    s = bias_hh.new_ones(4, m)
    s[2] = 2
    return s.view(-1)


def _tanh_via_sigmoid(x, out):
    """out <- tanh(x) = 2 sigmoid(2x) - 1."""
    return torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1)


def _lstm_forward(gx, h0, c0, weight_hh, bias_hh, mask, time_shuffle, reverse, save):
    """The forward loop without autograd.  Returns (out [T, B, H], h_T, c_T [K, B, m],
    saved): ``saved`` is None, or the buffers the backward needs if ``save``."""
    t_len, k, b, gm = gx.shape
    m = gm // 4
    width = k * m
    scale = _gate_scale(bias_hh, m)
    b_scaled = (bias_hh * scale).unsqueeze(1)   # [K, 1, 4m]
    w_t = weight_hh.transpose(1, 2)
    # h in time order, unit order: slot t+1 holds the state after time t, slot 0 (forward)
    # or T+1 (reverse) the initial one; hs: the same in shuffled order (product operands).
    slots = t_len + 2
    hu = gx.new_empty(slots, b, width)
    hs = gx.new_empty(slots, b, width) if time_shuffle else hu
    perm = _shuffle_index(width, k, gx.device) if time_shuffle else None
    cs = gx.new_empty(2, b, width)              # c: two slots, alternating
    first = t_len + 1 if reverse else 0
    last = 1 if reverse else t_len
    _grouped(hu[first], k).copy_(h0)
    if time_shuffle:
        torch.index_select(hu[first], 1, perm, out=hs[first])
    _grouped(cs[first % 2], k).copy_(c0)
    pre = gx.new_empty(k, b, gm)      # one step's gates
    tc = gx.new_empty(k, b, m)        # tanh(c_t)
    p_i, p_f, p_g, p_o = pre.split(m, -1)
    if save:
        # what the backward needs of each step:
        #   fac   = (g i(1-i), c_{t-1} f(1-f), i(1-g^2), tanh(c_t) o(1-o)): (dh, dc) -> dgates
        #   dhdc  = o (1 - tanh(c_t)^2)                                     dh -> dc
        #   fgate = f                                                       dc_t -> dc_{t-1}
        fac = gx.new_empty(k, t_len, b, gm)
        dhdc = gx.new_empty(k, t_len, b, m)
        fgate = gx.new_empty(k, t_len, b, m)
        sd = gx.new_empty(k, b, gm)   # s (1 - s) of every gate
        sd_i, sd_f, _, sd_o = sd.split(m, -1)
    keep = mask.unsqueeze(-1) if mask is not None else None  # [T, B, 1] bool
    hs_g = [_grouped(hs[s], k) for s in range(slots)]
    hu_g = [_grouped(hu[s], k) for s in range(slots)]
    cs_g = [_grouped(cs[s], k) for s in range(2)]
    steps = gx.unbind(0)
    order = range(t_len - 1, -1, -1) if reverse else range(t_len)
    for t in order:
        s_in, s_out = (t + 2, t + 1) if reverse else (t, t + 1)
        c_prev, c_new = cs_g[s_in % 2], cs_g[s_out % 2]
        torch.baddbmm(steps[t], hs_g[s_in], w_t, out=pre)
        torch.addcmul(b_scaled, pre, scale, out=pre)
        pre.sigmoid_()
        p_g.mul_(2).sub_(1)
        torch.mul(p_f, c_prev, out=c_new)
        c_new.addcmul_(p_i, p_g)
        _tanh_via_sigmoid(c_new, tc)
        torch.mul(p_o, tc, out=hu_g[s_out])
        if save:
            f_i, f_f, f_g, f_o = fac[:, t].split(m, -1)
            torch.mul(pre, pre, out=sd)
            torch.sub(pre, sd, out=sd)
            torch.mul(p_g, sd_i, out=f_i)
            torch.mul(c_prev, sd_f, out=f_f)
            torch.mul(p_i, p_g, out=f_g)
            torch.addcmul(p_i, f_g, p_g, value=-1, out=f_g)
            torch.mul(tc, sd_o, out=f_o)
            a = dhdc[:, t]
            torch.mul(p_o, tc, out=a)
            torch.addcmul(p_o, a, tc, value=-1, out=a)
            fgate[:, t].copy_(p_f)
        if keep is not None:
            kt = keep[t]
            torch.where(kt, hu[s_out], hu[s_in], out=hu[s_out])
            torch.where(kt, cs[s_out % 2], cs[s_in % 2], out=cs[s_out % 2])
        if time_shuffle:
            torch.index_select(hu[s_out], 1, perm, out=hs[s_out])
    # outputs in unit order, [T, B, H] (from_grouped of its [T, K, B, m] view is free)
    out = hu[1:t_len + 1]
    if mask is not None:
        out = out * keep
    h_t = hu_g[last].clone(memory_format=torch.contiguous_format)
    c_t = cs_g[last % 2].clone(memory_format=torch.contiguous_format)
    saved = (fac, dhdc, fgate, hs) if save else None
    return out, h_t, c_t, saved


def _lstm_backward(ctx, d_out, d_h, d_c):
    fac, dhdc, fgate = ctx.buffers
    weight_hh, hs = ctx.saved_tensors
    k, t_len, b, gm = fac.shape
    m = gm // 4
    width = k * m
    mask, time_shuffle, reverse = ctx.mask, ctx.time_shuffle, ctx.reverse
    dg = torch.empty_like(fac)                       # gate pre-activation gradients
    fac_i, fac_f, fac_g, fac_o = (x.unbind(1) for x in fac.split(m, -1))
    dg_t = dg.unbind(1)
    dg_i, dg_f, dg_g, dg_o = (x.unbind(1) for x in dg.split(m, -1))
    a_t, f_t = dhdc.unbind(1), fgate.unbind(1)
    if d_out is not None:
        d_out = d_out.reshape(t_len, b, width)
    dh = fac.new_empty(k, b, m)
    dc = fac.new_empty(k, b, m)
    gc = fac.new_zeros(k, b, m) if d_c is None else d_c.clone()   # gradient of c_t
    # gradient of the product operand: shuffled order (m_flat), and unit order (m_unit)
    m_flat = fac.new_zeros(b, width)
    m_grouped = _grouped(m_flat, k)
    if time_shuffle:
        inv = _shuffle_index(width, k, fac.device, inverse=True)
        m_unit_flat = fac.new_zeros(b, width)
    else:
        m_unit_flat = m_flat
    m_unit = _grouped(m_unit_flat, k)
    order = range(t_len) if reverse else range(t_len - 1, -1, -1)

    def gates_and_product(t, dh_t):
        torch.mul(dh_t, fac_o[t], out=dg_o[t])
        torch.mul(dc, fac_i[t], out=dg_i[t])
        torch.mul(dc, fac_f[t], out=dg_f[t])
        torch.mul(dc, fac_g[t], out=dg_g[t])
        torch.bmm(dg_t[t], weight_hh, out=m_grouped)
        if time_shuffle:
            torch.index_select(m_flat, 1, inv, out=m_unit_flat)

    if mask is None:
        # m_unit enters each step as the gradient of h_t from the steps after it: at the
        # first one, the gradient of the final state.
        if d_h is not None:
            m_unit.copy_(d_h)
        for t in order:
            if d_out is not None:
                torch.add(m_unit, _grouped(d_out[t], k), out=dh)
                dh_t = dh
            else:
                dh_t = m_unit  # read before the product below overwrites it
            torch.addcmul(gc, dh_t, a_t[t], out=dc)
            torch.mul(dc, f_t[t], out=gc)
            gates_and_product(t, dh_t)
        d_h0 = m_unit.clone(memory_format=torch.contiguous_format)
    else:
        keep = mask.view(t_len, 1, b, 1).to(fac.dtype)
        notkeep = 1 - keep
        ph = fac.new_zeros(k, b, m) if d_h is None else d_h.clone()  # pass-through of dh
        for t in order:
            kt, nk = keep[t], notkeep[t]
            torch.add(m_unit, ph, out=dh)       # gradient of the state h_t
            torch.mul(dh, nk, out=ph)           # padded step: it passes to h_{t-1}
            if d_out is not None:
                dh.add_(_grouped(d_out[t], k))
            dh.mul_(kt)                         # real step: it enters the cell
            torch.addcmul(gc, dh, a_t[t], out=dc)
            dc.mul_(kt)
            gc.mul_(nk)
            gc.addcmul_(dc, f_t[t])
            gates_and_product(t, dh)
        d_h0 = m_unit + ph
    # dW_hh[k] = sum_t dG_t[k]^T h_in_t[k], h_in_t the operand slot (t, or t+2 in reverse):
    # consecutive slots are a [T*B, H] matrix, whose grouped view BLAS reads in place
    h_in = (hs[2:] if reverse else hs[:t_len]).view(t_len * b, width)
    d_w = torch.bmm(dg.view(k, t_len * b, gm).transpose(1, 2), _grouped(h_in, k))
    return dg.transpose(0, 1), d_h0, gc, d_w, dg.sum((1, 2))


class LSTMScan(torch.autograd.Function):
    """The whole LSTM recurrence as one autograd node (backend ``torch``)."""

    @staticmethod
    def forward(ctx, gx, h0, c0, weight_hh, bias_hh, mask, time_shuffle, reverse):
        out, h_t, c_t, saved = _lstm_forward(gx, h0, c0, weight_hh, bias_hh, mask,
                                             time_shuffle, reverse, save=True)
        fac, dhdc, fgate, hs = saved
        ctx.buffers = (fac, dhdc, fgate)
        # hs through save_for_backward: ``out`` may be a view of it, and an in-place change
        # of ``out`` must fail the backward rather than corrupt dW_hh
        ctx.save_for_backward(weight_hh, hs)
        ctx.mask, ctx.time_shuffle, ctx.reverse = mask, time_shuffle, reverse
        return out, h_t, c_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_h, d_c):
        grads = _lstm_backward(ctx, d_out, d_h, d_c)
        return grads + (None, None, None)


def lstm_scan_torch(gx, h0, c0, weight_hh, bias_hh, mask=None, time_shuffle=False,
                    reverse=False):
    """``scan`` for the LSTM, backend ``torch``: -> (out [T, K, B, m], (h_T, c_T))."""
    t_len, k, b, _ = gx.shape
    if t_len == 0:
        return gx.new_zeros(0, k, b, gx.shape[-1] // 4), (h0, c0)
    need_grad = torch.is_grad_enabled() and _any_requires_grad(gx, h0, c0, weight_hh, bias_hh)
    if need_grad:
        out, h_t, c_t = LSTMScan.apply(gx, h0, c0, weight_hh, bias_hh, mask, time_shuffle, reverse)
    else:
        with torch.no_grad():
            out, h_t, c_t, _ = _lstm_forward(gx, h0, c0, weight_hh, bias_hh, mask, time_shuffle,
                                             reverse, save=False)
    return out.view(t_len, b, k, -1).transpose(1, 2), (h_t, c_t)


# --------------------------------------------------------------------------- cpp
def _cpp_forward(cell, gx, state, weight_hh, bias_hh, mask, time_shuffle, reverse, save):
    """The C++ forward loop of any cell -> (out [T, B, H], final state tuple, the factors
    and operand slots that the backward needs (empty unless ``save``)).  gx: [T, K, B, G*m],
    or a list of the K groups' [T, B, G*m]."""
    from .kernels import cpu_rnn

    lstm = cell == "lstm"
    cpu_rnn.check_switches()
    gx = list(gx) if isinstance(gx, (list, tuple)) else [gx]
    out, h_t, c_t, fac, hs = cpu_rnn.load().forward(
        gx, state[0], state[1] if lstm else None, weight_hh, bias_hh, mask, time_shuffle,
        reverse, save, cpu_rnn.CELL_IDS[cell])
    return out, ((h_t, c_t) if lstm else (h_t,)), fac, hs


class CppScan(torch.autograd.Function):
    """The recurrence of one layer direction with the forward and backward loops in C++
    (backend ``cpp``), for every cell; for the LSTM the same inputs, outputs, gradients and
    saved tensors as ``LSTMScan`` (``hs`` through save_for_backward)."""

    @staticmethod
    def forward(ctx, cell, gx, weight_hh, bias_hh, mask, time_shuffle, reverse, *state):
        out, final, fac, hs = _cpp_forward(cell, gx, state, weight_hh, bias_hh, mask,
                                           time_shuffle, reverse, True)
        ctx.fac, ctx.cell = fac, cell
        ctx.save_for_backward(weight_hh, hs)
        ctx.mask, ctx.time_shuffle, ctx.reverse = mask, time_shuffle, reverse
        return (out,) + final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_h, d_c=None):
        weight_hh, hs = ctx.saved_tensors
        d_gx, d_w, d_b, d_state, _ = _cpp_backward(ctx, weight_hh, hs,
                                                   ctx.needs_input_grad[2], d_out, d_h, d_c)
        return (None, d_gx, d_w, d_b, None, None, None) + d_state


def _cpp_backward(ctx, weight_hh, hs, weight_grad, d_out, d_h, d_c, input_t=False):
    """The C++ backward of a scan saved in ``ctx`` (fac, cell, mask, time_shuffle,
    reverse) -> (d_gx [T, K, B, G*m] (a view of [K, T, B, G*m]), dW_hh (None unless
    ``weight_grad``), d_bias_hh, the state's gradients, the input-side gate gradients
    transposed, [K, G*m, T*B] (None unless ``input_t``: for dW_ih by
    :func:`onednn.weight_grad_t`)).  Where oneDNN computes dW_hh, or ``input_t``, the C++
    backward writes the gate gradients transposed as well."""
    from .kernels import cpu_rnn

    # the operand slots that dW_hh reads, [T*B, H]; its product by oneDNN where it pays
    h_in = hs.narrow(0, 2 if ctx.reverse else 0, ctx.fac.shape[1]).flatten(0, 1)
    by_onednn = weight_grad and onednn.wanted(h_in, weight_hh)
    transposed = by_onednn or input_t
    d_gx, d_h0, d_c0, d_w, d_b = cpu_rnn.load().backward(
        ctx.fac, hs, weight_hh, ctx.mask, d_out, d_h, d_c, ctx.time_shuffle, ctx.reverse,
        cpu_rnn.CELL_IDS[ctx.cell], weight_grad and not transposed, transposed)
    d_t = None
    if transposed:  # [S, K, G*m, T*B]: the hidden side, then (GRU) the input side
        d_t = d_w
        if by_onednn:
            d_w = onednn.weight_grad_t(d_t[0], h_in)
        elif weight_grad:  # dW_hh[k] = dG[k]^T h_k (PyTorch's product, as the C++ one)
            k = weight_hh.shape[0]
            d_w = torch.bmm(d_t[0], h_in.view(h_in.shape[0], k, -1).transpose(0, 1))
        else:
            d_w = None
    elif not weight_grad:
        d_w = None
    d_state = (d_h0, d_c0) if ctx.cell == "lstm" else (d_h0,)
    return d_gx, d_w, d_b, d_state, (d_t[-1] if input_t else None)


def _cpp_projected_forward(cell, x, weight_ih, bias_ih, weight_hh, bias_hh, mask,
                           time_shuffle, reverse, state, save):
    """x [T, B, I]'s input projections by oneDNN, one tensor per group, handed to the C++
    forward loop as they are -> (x as [T*B, I], then what :func:`_cpp_forward` returns)."""
    t, b, _ = x.shape
    flat = x.reshape(t * b, -1)
    parts = [p.view(t, b, -1) for p in onednn.project_groups(flat, weight_ih, bias_ih)]
    return (flat,) + _cpp_forward(cell, parts, state, weight_hh, bias_hh, mask, time_shuffle,
                                  reverse, save)


class CppProjectedScan(torch.autograd.Function):
    """A layer direction's input projection by oneDNN (one product per group,
    :mod:`grnn_fairseq.kernels.onednn`) and its C++ recurrence as one node.  The groups'
    projections go to the C++ loop as oneDNN returns them, one tensor per group, instead of
    being copied into one [T, K, B, G*m] tensor first (a copy of 26 MB per training step
    of the issue's 4-group layer); the backward computes the projection's gradients from
    the C++ loop's d_gx (dW_ih from its transpose, which the loop writes step by step:
    :func:`onednn.weight_grad_t`), and the LSTM's and RNN's input bias gradient is the
    recurrent bias's, which the loop sums anyway (the GRU's differ: its candidate's
    recurrent term is gated)."""

    @staticmethod
    def forward(ctx, cell, x, weight_ih, bias_ih, weight_hh, bias_hh, mask, time_shuffle,
                reverse, *state):
        flat, out, final, fac, hs = _cpp_projected_forward(
            cell, x, weight_ih, bias_ih, weight_hh, bias_hh, mask, time_shuffle, reverse,
            state, True)
        ctx.fac, ctx.cell, ctx.x_shape = fac, cell, x.shape
        ctx.save_for_backward(flat, weight_ih, weight_hh, hs)
        ctx.mask, ctx.time_shuffle, ctx.reverse = mask, time_shuffle, reverse
        return (out,) + final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_h, d_c=None):
        flat, weight_ih, weight_hh, hs = ctx.saved_tensors
        need = ctx.needs_input_grad
        gru = ctx.cell == "gru"
        d_gx, d_w_hh, d_b_hh, d_state, d_t = _cpp_backward(ctx, weight_hh, hs, need[4],
                                                           d_out, d_h, d_c, need[2])
        d = d_gx.transpose(0, 1).flatten(1, 2)  # [K, T*B, G*m], contiguous
        d_x = d_w_ih = d_b_ih = None
        if need[1]:
            d_x = onednn.input_grad(d, weight_ih).view(ctx.x_shape)
        if need[2]:
            d_w_ih = onednn.weight_grad_t(d_t, flat, need[3] and gru)
            if need[3] and gru:
                d_w_ih, d_b_ih = d_w_ih
        if need[3] and d_b_ih is None:
            d_b_ih = d.sum(1) if gru else d_b_hh
        return ((None, d_x, d_w_ih, d_b_ih, d_w_hh, d_b_hh, None, None, None)
                + tuple(d_state))


def project_scan(x, weight_ih, bias_ih, state, weight_hh, bias_hh, cell, time_shuffle=False,
                 mask=None, reverse=False, backend=None):
    """:func:`project_input` of every position of x [T, B, I], then :func:`scan` (same
    arguments and result).  On backend ``cpp`` with the projection by oneDNN, both in one
    node (:class:`CppProjectedScan`; without autograd the same data flow): the groups'
    projections are not copied into one tensor; by PyTorch's products, the LSTM's and
    RNN's input bias is added in the loop (:func:`_project_blas`)."""
    t, b, _ = x.shape
    k = weight_ih.shape[0]
    flat = x.reshape(t * b, -1)
    if t and b and resolve_backend(backend, cell, x.device, x.dtype) == "cpp":
        # oneDNN is asked once per projection: it counts the products of each new shape
        if not onednn.wanted(flat, weight_ih):
            if cell == "gru":
                gx = _project_blas(flat, weight_ih, bias_ih)
            else:  # the input bias joins the recurrent one (see the function)
                gx = _project_blas(flat, weight_ih)
                bias_hh = bias_ih + bias_hh
        else:
            if torch.is_grad_enabled() and _any_requires_grad(x, weight_ih, bias_ih,
                                                              weight_hh, bias_hh, *state):
                out, *final = CppProjectedScan.apply(cell, x, weight_ih, bias_ih, weight_hh,
                                                     bias_hh, mask, time_shuffle, reverse,
                                                     *state)
            else:
                with torch.no_grad():
                    _, out, final, _, _ = _cpp_projected_forward(
                        cell, x, weight_ih, bias_ih, weight_hh, bias_hh, mask, time_shuffle,
                        reverse, state, False)
            return out.view(t, b, k, -1).transpose(1, 2), tuple(final)
    else:
        gx = project_input(flat, weight_ih, bias_ih)
    gx = gx.view(k, t, b, -1).transpose(0, 1)
    return scan(gx, state, weight_hh, bias_hh, cell, time_shuffle, mask, reverse, backend)


def scan_cpp(cell, gx, state, weight_hh, bias_hh, mask=None, time_shuffle=False,
             reverse=False):
    """``scan`` on backend ``cpp``: -> (out [T, K, B, m], final state tuple)."""
    t_len, k, b, _ = gx.shape
    if t_len == 0 or b == 0:  # nothing to run: no output, the state unchanged
        return gx.new_zeros(t_len, k, b, weight_hh.shape[-1]), tuple(state)
    if torch.is_grad_enabled() and _any_requires_grad(gx, weight_hh, bias_hh, *state):
        out, *final = CppScan.apply(cell, gx, weight_hh, bias_hh, mask, time_shuffle, reverse,
                                    *state)
    else:
        with torch.no_grad():
            out, final, _, _ = _cpp_forward(cell, gx, state, weight_hh, bias_hh, mask,
                                            time_shuffle, reverse, False)
    return out.view(t_len, b, k, -1).transpose(1, 2), tuple(final)
