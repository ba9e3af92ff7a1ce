"""The ``cpp`` engine backend (the LSTM, GRU and Elman RNN loops in C++, built just in
time) against the reference loop: outputs, final states and every gradient, in float64
(1e-10) and float32, with and without the time-step shuffle, padding on either side, both
directions; then the edge cases (batch 1, T=1, T=0), inference, the decode step and the
dispatch rules."""
import copy
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings

import pytest
import torch

from grnn_fairseq import engine
from grnn_fairseq.errors import ConfigError
from grnn_fairseq.cells import GATES
from grnn_fairseq.kernels import cpu_rnn
from grnn_fairseq.recurrent import RecurrentStack

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler (c++ or $CXX) on PATH: the cpp backend cannot be built",
                allow_module_level=True)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build (or load from the cache) once; a failure here names the cause."""
    return cpu_rnn.load()


def _problem(k, m, t_len, b, dtype, padding=False, seed=0, cell="lstm", w_scale=0.5):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    gm = GATES[cell] * m
    p = dict(gx=rand(t_len, k, b, gm), h0=rand(k, b, m), c0=rand(k, b, m),
             w_hh=rand(k, gm, m, scale=w_scale), b_hh=rand(k, gm, scale=0.5))
    if cell != "lstm":
        del p["c0"]
    p = {n: v.requires_grad_() for n, v in p.items()}
    mask = None
    if padding and t_len >= 2:
        mask = torch.ones(t_len, b, dtype=torch.bool)
        mask[t_len - 2:, 0] = False          # right padding
        mask[:2, b - 1] = False              # left padding (the same row when b == 1)
    up = [rand(t_len, k, b, m), rand(k, b, m), rand(k, b, m)]
    return p, mask, up


def _cell(p):
    k, gm, m = p["w_hh"].shape
    return next(c for c, g in GATES.items() if g == gm // m)


def _state(p):
    return (p["h0"], p["c0"]) if "c0" in p else (p["h0"],)


def _names(p):
    return ("out", "h_T", "c_T")[:1 + len(_state(p))] + tuple(f"d_{n}" for n in p)


def _run(backend, p, mask, up, shuffle, reverse, grad=True):
    out, final = engine.scan(p["gx"], _state(p), p["w_hh"], p["b_hh"], _cell(p),
                             time_shuffle=shuffle, mask=mask, reverse=reverse, backend=backend)
    if not grad:
        return (out,) + final
    loss = sum((a * w).sum() for a, w in zip((out,) + final, up))
    return (out,) + final + torch.autograd.grad(loss, list(p.values()), allow_unused=True)


def _compare(p, mask, up, shuffle, reverse, dtype):
    ref = _run("reference", p, mask, up, shuffle, reverse)
    got = _run("cpp", p, mask, up, shuffle, reverse)
    names = _names(p)
    assert len(names) == len(ref) == len(got)
    for name, a, b_ in zip(names, ref, got):
        assert b_.dtype == a.dtype and b_.shape == a.shape, name
        torch.testing.assert_close(b_, a, atol=TOL[dtype], rtol=TOL[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["noshuffle", "shuffle"])
@pytest.mark.parametrize("k,m", [(1, 5), (2, 6), (4, 8), (4, 6)])  # m % K != 0 included
def test_cpp_matches_reference(k, m, shuffle, padding, reverse, dtype):
    p, mask, up = _problem(k, m, 6, 3, dtype, padding)
    _compare(p, mask, up, shuffle, reverse, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["noshuffle", "shuffle"])
@pytest.mark.parametrize("k,m", [(1, 5), (2, 6), (4, 6)])
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_gru_and_rnn_match_reference(cell, k, m, shuffle, padding, reverse, dtype):
    """The GRU's and the Elman RNN's C++ loops: outputs, final state and the gradients of
    gx, h0, W_hh and b_hh (the GRU's input- and recurrent-side gate gradients differ)."""
    p, mask, up = _problem(k, m, 6, 3, dtype, padding, cell=cell)
    _compare(p, mask, up, shuffle, reverse, dtype)


# The fused step's vector units (narrowest first) and the two-pass step ("twopass")
UNITS = list(cpu_rnn.UNITS)
STEPS = UNITS + ["twopass"]


def _use_step(step, monkeypatch, built):
    """Switch to one forward step: a vector unit of the fused step (skipped where this CPU
    lacks it) or the two-pass step.  -> the fused-call counter's value before."""
    if step == "twopass":
        monkeypatch.setenv("GRNN_CPU_FUSED", "0")
        monkeypatch.delenv("GRNN_CPU_ISA", raising=False)
    else:
        if UNITS.index(step) > UNITS.index(built.detected_isa()):
            pytest.skip(f"this CPU has no {step} (its widest unit: {built.detected_isa()})")
        monkeypatch.setenv("GRNN_CPU_FUSED", "1")
        monkeypatch.setenv("GRNN_CPU_ISA", step)
    return built.fused_forward_calls()


def _fused_product(step, m):
    """Whether the backward's product of each step runs in registers (the fused forward's
    unit, where its lanes divide m) rather than as a BLAS call."""
    return step != "twopass" and m % {"generic": 4, "avx2": 8, "avx512": 16}[step] == 0


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["noshuffle", "shuffle"])
@pytest.mark.parametrize("k,m,b", [(1, 16, 4), (2, 32, 5), (4, 16, 7), (4, 32, 1), (8, 16, 6),
                                   (2, 120, 3), (2, 100, 3), (1, 250, 2), (2, 64, 3),
                                   (2, 64, 9)])
def test_fp32_fused_step_matches_reference(k, m, b, shuffle, padding, reverse, step,
                                           monkeypatch, built):
    """fp32 over T >= 4 steps takes the fused step (product of each block of units in
    registers, the cell on it at once, the operand read through the shuffle's index), with
    the tile of each vector unit the CPU has (16, 8 or 4 lanes; the last block padded where
    they do not divide m: 120 with 16 lanes, 100 with 16 and 8, 250 with all); the two-pass
    step otherwise.  Each against the reference, forward and every gradient; batch sizes
    that leave every count of rows after the tiles of 2 or 4 rows, and one (m = 64, 9
    rows) where AVX-512's tile prefetches the next rows' projections.  The backward's product
    of each step: in registers where the lanes divide m (16: 1 vector; 32 with 8 lanes: 4;
    120 with 8 lanes: 15 = 3 blocks of 4 and one of 3), else BLAS; its inputs in chunks
    (m = 64 with 16 lanes: 2 chunks of 128 of the 256), the sum carried between them."""
    before = _use_step(step, monkeypatch, built)
    before_backward = built.fused_backward_calls()
    p, mask, up = _problem(k, m, 6, b, torch.float32, padding)
    _compare_fp64(p, mask, up, shuffle, reverse)
    assert (built.fused_forward_calls() > before) == (step != "twopass")
    assert (built.fused_backward_calls() > before_backward) == _fused_product(step, m)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["noshuffle", "shuffle"])
@pytest.mark.parametrize("k,m,b", [(1, 16, 4), (4, 16, 7), (2, 32, 1), (2, 100, 5)])
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_fp32_fused_step_gru_rnn(cell, k, m, b, shuffle, padding, reverse, step,
                                 monkeypatch, built):
    """The fused fp32 step of the GRU (3 gates in registers, the interpolation with each
    unit's own h_{t-1}) and the RNN (1 gate) with each vector unit's tile, and their two-pass
    step, against the float64 reference; a partial last block (m = 100) and leftover rows
    included.  W_hh at the scale of PyTorch's initialisation (1/sqrt(m)): with larger weights
    the RNN is chaotic and amplifies any fp32 rounding over the steps beyond fp32 tolerance,
    in either path."""
    before = _use_step(step, monkeypatch, built)
    before_backward = built.fused_backward_calls()
    p, mask, up = _problem(k, m, 6, b, torch.float32, padding, cell=cell, w_scale=m ** -0.5)
    _compare_fp64(p, mask, up, shuffle, reverse)
    assert (built.fused_forward_calls() > before) == (step != "twopass")
    assert (built.fused_backward_calls() > before_backward) == _fused_product(step, m)


def _compare_fp64(p, mask, up, shuffle, reverse):
    """fp32 ``cpp`` against the float64 reference: fp32 accuracy scaled by each tensor's
    largest value (the gradients of wide groups reach tens, and sums of hundreds of fp32
    products carried back over the steps differ from float64 by up to ~1e-5 of that, in
    either path)."""
    p64 = {n: v.detach().double().requires_grad_() for n, v in p.items()}
    ref = _run("reference", p64, mask, [u.double() for u in up], shuffle, reverse)
    got = _run("cpp", p, mask, up, shuffle, reverse)
    names = _names(p)
    for name, a, b_ in zip(names, ref, got):
        assert b_.dtype == torch.float32 and b_.shape == a.shape, name
        tol = 2e-5 * max(1.0, a.abs().max().item())
        torch.testing.assert_close(b_.double(), a, atol=tol, rtol=2e-5,
                                   msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.parametrize("unit", UNITS)
def test_fused_step_selection_and_accuracy(unit, monkeypatch, built):
    """Which forward step runs (counted by the extension): fused for fp32 over >= 4 steps
    with a last block (of the unit's lanes) at most 1/8 padding, two-pass for fp64, single
    decoding steps, a half-empty last block and GRNN_CPU_FUSED=0; both steps against a
    float64 reference to fp32 accuracy."""
    def takes_fused(k, m, t_len, dtype, cell="lstm"):
        p, _, _ = _problem(k, m, t_len, 2, dtype, cell=cell)
        before = built.fused_forward_calls()
        with torch.no_grad():
            _run("cpp", p, None, None, True, False, grad=False)
        return built.fused_forward_calls() - before == 1

    _use_step(unit, monkeypatch, built)
    lanes = built.fused_lanes()
    assert lanes == {"generic": 4, "avx2": 8, "avx512": 16}[unit] and built.fused_isa() == unit
    monkeypatch.delenv("GRNN_CPU_FUSED", raising=False)
    assert takes_fused(2, 32, 4, torch.float32)
    assert takes_fused(1, 250, 4, torch.float32)           # WMT widths: 1000 / 4 groups
    assert not takes_fused(2, lanes * 3 // 2, 4, torch.float32)  # a half-empty last block
    assert not takes_fused(2, 32, 4, torch.float64)
    assert not takes_fused(2, 32, 3, torch.float32)        # decoding steps: no packing
    assert takes_fused(2, 32, 4, torch.float32, "gru")
    assert takes_fused(1, 250, 4, torch.float32, "rnn")
    assert not takes_fused(2, 32, 4, torch.float64, "gru")
    monkeypatch.setenv("GRNN_CPU_FUSED", "0")
    assert not takes_fused(2, 32, 4, torch.float32)
    p, mask, up = _problem(4, 32, 8, 6, torch.float32, padding=True)
    for fused in ("1", "0"):
        monkeypatch.setenv("GRNN_CPU_FUSED", fused)
        before = built.fused_forward_calls()
        _compare_fp64(p, mask, up, True, False)
        assert (built.fused_forward_calls() > before) == (fused == "1")


def test_cpu_switches_refused_by_name(monkeypatch, built):
    """GRNN_CPU_ISA must name a vector unit this CPU has, GRNN_CPU_FUSED 0 or 1: anything
    else is refused before the library runs, naming the values that work."""
    p, _, _ = _problem(2, 16, 4, 2, torch.float32)
    cases = [("GRNN_CPU_ISA", "sse", r"GRNN_CPU_ISA='sse' is not one of generic, avx2, avx512"),
             ("GRNN_CPU_FUSED", "yes", r"GRNN_CPU_FUSED='yes': expected 0 or 1")]
    widest = built.detected_isa()
    if widest != "avx512":  # a unit wider than this CPU's
        allowed = ", ".join(UNITS[:UNITS.index(widest) + 1])
        cases.append(("GRNN_CPU_ISA", "avx512", f"widest vector unit is {widest}; set one of "
                      f"{allowed}, or unset it"))
    for variable, value, message in cases:
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigError, match=message):
            _run("cpp", p, None, None, True, False)
        monkeypatch.delenv(variable)
    if widest != "avx512":  # the library's own check, for callers of the op
        monkeypatch.setenv("GRNN_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match=f"widest vector unit is {widest}"):
            built.forward([p["gx"].detach()], p["h0"].detach(), p["c0"].detach(),
                          p["w_hh"].detach(), p["b_hh"].detach(), None, True, False, False, 0)


@pytest.mark.parametrize("fused", ["1", "0"], ids=["fused", "twopass"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_fp32_steps_split_between_threads(cell, fused, monkeypatch):
    """A problem large enough for the fused step's unit blocks (and the two-pass step's
    rows) to be shared out between threads: 2 threads, 4 groups of 64 units, 33 rows."""
    monkeypatch.setenv("GRNN_CPU_FUSED", fused)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p, mask, up = _problem(4, 64, 5, 33, torch.float32, padding=True, cell=cell)
        _compare_fp64(p, mask, up, True, False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("t_len,b", [(1, 3), (5, 1), (1, 1)], ids=["T1", "B1", "T1B1"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_small_shapes(cell, t_len, b, padding):
    for reverse in (False, True):
        p, mask, up = _problem(4, 8, t_len, b, torch.float64, padding, cell=cell)
        _compare(p, mask, up, True, reverse, torch.float64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_fully_padded_rows_and_partial_upstream(cell):
    """A sequence that is all padding keeps its initial state; only h_T is used."""
    p, _, up = _problem(2, 4, 5, 3, torch.float64, cell=cell)
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[:, 1] = False
    mask[3:, 2] = False
    ref, got = [engine.scan(p["gx"], _state(p), p["w_hh"], p["b_hh"], cell, True,
                            mask, False, backend=be) for be in ("reference", "cpp")]
    torch.testing.assert_close(got[1][0][:, 1], p["h0"][:, 1], atol=0, rtol=0)
    g_ref = torch.autograd.grad(ref[1][0].square().sum(), list(p.values()), allow_unused=True)
    g_got = torch.autograd.grad(got[1][0].square().sum(), list(p.values()), allow_unused=True)
    for a, b_ in zip(g_ref, g_got):
        if a is None:
            assert b_ is None or not b_.abs().any()
        else:
            torch.testing.assert_close(b_, a, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_zero_length(cell):
    p, _, _ = _problem(4, 8, 0, 3, torch.float64, cell=cell)
    out, final = engine.scan(p["gx"], _state(p), p["w_hh"], p["b_hh"], cell, True,
                             backend="cpp")
    assert out.shape == (0, 4, 3, 8)
    assert len(final) == len(_state(p))
    for got, want in zip(final, _state(p)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_inference_matches_reference(cell, dtype):
    p, mask, up = _problem(4, 8, 6, 3, dtype, padding=True, cell=cell)
    with torch.no_grad():
        for shuffle in (False, True):
            for reverse in (False, True):
                ref = _run("reference", p, mask, up, shuffle, reverse, grad=False)
                got = _run("cpp", p, mask, up, shuffle, reverse, grad=False)
                for a, b_ in zip(ref, got):
                    torch.testing.assert_close(b_, a, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_layer_with_non_contiguous_inputs_and_large_rows(cell):
    """Through RecurrentStack (strided gx from the input projection, both directions, two
    layers), with enough rows (B*K) for the pointwise pass to be split between threads."""
    torch.manual_seed(0)
    x = torch.randn(5, 40, 256, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(5, 40, dtype=torch.bool)   # True at padding
    pad[3:, 1] = True
    pad[:2, 7] = True
    results = []
    for backend in ("reference", "cpp"):
        torch.manual_seed(1)
        stack = RecurrentStack(256, 256, num_layers=2, cell=cell, groups=4,
                               rearrangement="both", bidirectional=True,
                               backend=backend).double()
        out, _ = stack(x, padding_mask=pad)[:2]
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), [x] + list(stack.parameters()))
        results.append((out,) + grads)
    for a, b_ in zip(*results):
        torch.testing.assert_close(b_, a, atol=1e-10, rtol=1e-10)


def _tensors(nested):
    """The tensors of nested lists / tuples, in order."""
    if isinstance(nested, torch.Tensor):
        return [nested]
    return [t for item in nested for t in _tensors(item)]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_projection_by_blas_leaves_the_input_bias_to_the_loop(cell, monkeypatch):
    """With PyTorch's products (GRNN_CPU_GEMM=blas) the LSTM's and RNN's projections are
    unbiased and the C++ loop adds b_ih + b_hh (the GRU keeps the biased product): counted,
    and the outputs, final states and every gradient (b_ih's and b_hh's apart) against the
    reference engine in float64, with and without autograd."""
    monkeypatch.setenv("GRNN_CPU_GEMM", "blas")
    calls = []  # per projection: whether it was given the bias
    real = engine._project_blas
    monkeypatch.setattr(engine, "_project_blas",
                        lambda *a: calls.append(len(a) > 2 and a[2] is not None) or real(*a))
    torch.manual_seed(0)
    x = torch.randn(6, 5, 32, requires_grad=True)
    results = []
    for backend, dtype in (("reference", torch.float64), ("cpp", torch.float32)):
        torch.manual_seed(1)
        stack = RecurrentStack(32, 32, num_layers=1, cell=cell, groups=4, backend=backend,
                               bidirectional=True)
        for p_ in stack.parameters():
            if p_.dim() == 2:  # the biases larger than PyTorch's init, so that they count
                torch.nn.init.uniform_(p_, -1.0, 1.0)
        stack.to(dtype)
        xd = x.to(dtype)
        calls.clear()
        with torch.no_grad():
            out_ng, final_ng = stack(xd)[:2]
        out, final = stack(xd)[:2]
        grads = torch.autograd.grad((out * out.detach().cos()).sum(),
                                    [x] + list(stack.parameters()))
        results.append([out_ng, out] + _tensors(final_ng) + _tensors(final) + list(grads))
    biased = cell == "gru"
    assert calls == [biased] * 4
    names = [n for n, _ in stack.named_parameters()]
    assert sum("bias" in n for n in names) == 4  # b_ih and b_hh of each direction
    for a, b_ in zip(*results):
        torch.testing.assert_close(b_.double(), a.double(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cell,backend", [("lstm", "cpp"), ("gru", "cpp"), ("gru", None),
                                          ("rnn", None)])
def test_decode_step_matches_reference(cell, backend, monkeypatch):
    """Single decoding steps without autograd take the C++ step: the LSTM where ``cpp`` is
    asked for by name, the GRU and RNN by default (counted); two layers, the time shuffle,
    random states, against the reference step."""
    monkeypatch.delenv("GRNN_BACKEND", raising=False)
    calls = []
    real = engine._step_cpp
    monkeypatch.setattr(engine, "_step_cpp", lambda *a: calls.append(a[0]) or real(*a))
    torch.manual_seed(0)
    stack = RecurrentStack(8, 8, num_layers=2, cell=cell, groups=4, backend=backend).double()
    x = torch.randn(3, 8, dtype=torch.double)
    states = [tuple(torch.randn_like(t) for t in s[0]) for s in stack.zero_state(3, x)]
    h_ref, s_ref = _as_reference(stack).step(x, states)
    assert calls == []
    with torch.no_grad():
        h_got, s_got = stack.step(x, states)       # no autograd: the C++ step
    assert calls == [cell, cell]
    torch.testing.assert_close(h_got, h_ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(s_ref, s_got):
        assert len(a) == len(b)
        for x1, x2 in zip(a, b):
            torch.testing.assert_close(x2, x1, atol=1e-12, rtol=1e-12)


def _as_reference(stack):
    """A copy of ``stack`` (same weights) that runs on the reference backend."""
    ref = copy.deepcopy(stack)
    for layer in ref.layers:
        layer.backend = "reference"
    return ref


def _chained_steps(model, xs, init, up, sequence=False):
    """``model.step`` over xs [T, B, I] from the states ``init`` (with the weights of
    ``model.step_weights()`` for the whole sequence if ``sequence``, as RNNSearch's decoder
    takes them), loss on every step's output (times up[t]) and on the final states
    -> [the outputs, the final states, the gradients of xs, init and every parameter]."""
    weights = model.step_weights() if sequence else None
    states, loss, tops = init, 0, []
    for t in range(len(xs)):
        top, states = model.step(xs[t], states, weights)
        tops.append(top)
        loss = loss + (top * up[t]).sum()
    loss = loss + sum((s * s).sum() for layer in states for s in layer)  # final states
    leaves = [xs] + [s for layer in init for s in layer] + list(model.parameters())
    finals = [s.detach() for layer in states for s in layer]
    return [torch.stack(tops)] + finals + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("k,rearrangement", [(1, "none"), (4, "both"), (4, "layer")])
def test_training_steps_run_the_cpp_scan(cell, k, rearrangement, monkeypatch):
    """A group decoder trained step by step (autograd on) runs each layer step as the C++
    scan of one step (counted; K = 1 keeps torch's ops): three chained steps of a two-layer
    stack with dropout off, against the same stack on the reference backend; outputs, final
    states and the gradients of the inputs, the initial states and every parameter."""
    monkeypatch.delenv("GRNN_BACKEND", raising=False)
    calls = []
    real = engine.scan_cpp
    monkeypatch.setattr(engine, "scan_cpp", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    torch.manual_seed(1)
    stack = RecurrentStack(8, 12, num_layers=2, cell=cell, groups=k,
                           rearrangement=rearrangement).double()
    ref = _as_reference(stack)
    xs = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    init = [tuple(torch.randn_like(t).requires_grad_() for t in s[0])
            for s in stack.zero_state(5, xs)]
    up = torch.randn(3, 5, 12, dtype=torch.double)

    expected = _chained_steps(ref, xs, init, up)
    assert calls == []
    got = _chained_steps(stack, xs, init, up)
    assert calls == ([cell] * 6 if k > 1 else [])    # 3 steps x 2 layers
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("k,rearrangement,sharing_rate",
                         [(1, "none", 0.0), (4, "both", 0.0), (4, "time", 0.5), (3, "layer", 0.0)])
def test_training_steps_hand_their_weight_gradients_to_the_sequence(
        cell, k, rearrangement, sharing_rate, monkeypatch):
    """RNNSearch's decoder trains step by step with ``step_weights()``: on backend ``cpp``
    every layer step is one ``CppTrainStep`` (counted), whose backward computes no weight
    gradient (the C++ backward is asked for none) and hands dG, x and the operand to the
    sequence, which computes them once.  Four chained steps of a two-layer stack (restricted
    weights included), loss on every step's output and on the final states, against the
    same stack on the reference backend: outputs, final states and the gradients of the
    inputs, the initial states and every parameter, in float64."""
    monkeypatch.delenv("GRNN_BACKEND", raising=False)
    steps, weight_grads = [], []
    real_step, real_load = engine.cpp_train_step, cpu_rnn.load()

    class Counted:  # the extension, with its backward's weight_grad argument recorded
        def __getattr__(self, name):
            return getattr(real_load, name)

        def backward(self, *args):
            weight_grads.append(args[-1] if len(args) == 11 else True)
            return real_load.backward(*args)

    monkeypatch.setattr(engine, "cpp_train_step",
                        lambda *a, **kw: steps.append(a[6]) or real_step(*a, **kw))
    monkeypatch.setattr(cpu_rnn, "load", lambda: Counted())
    torch.manual_seed(1)
    stack = RecurrentStack(6 * k, 4 * k, num_layers=2, cell=cell, groups=k,
                           rearrangement=rearrangement, sharing_rate=sharing_rate).double()
    ref = _as_reference(stack)
    xs = torch.randn(4, 5, 6 * k, dtype=torch.double, requires_grad=True)
    init = [tuple(torch.randn_like(t).requires_grad_() for t in s[0])
            for s in stack.zero_state(5, xs)]
    up = torch.randn(4, 5, 4 * k, dtype=torch.double)

    expected = _chained_steps(ref, xs, init, up, sequence=True)
    assert steps == [] and weight_grads == []
    got = _chained_steps(stack, xs, init, up, sequence=True)
    assert steps == [cell] * 8    # 4 steps x 2 layers
    assert weight_grads == [False] * 8
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_sequence_weight_gradients_per_backward():
    """Each backward through the C++ training steps of a sequence computes the weight
    gradients of its own steps once: a second backward through the same graph
    (retain_graph) adds the same gradients again, and nothing of the first is counted
    twice; a backward that does not ask for the weights' gradients (autograd.grad of the
    input) leaves nothing behind for the next; gradients that reach the weights another
    way as well are added."""
    torch.manual_seed(0)
    stack = RecurrentStack(16, 16, num_layers=2, groups=2, backend="cpp")
    weights = stack.step_weights()
    assert all(w.engine == "cpp" and w.grads is not None for w in weights)
    x = torch.randn(5, 16, requires_grad=True)
    states = [s[0] for s in stack.zero_state(5, x)]
    for _ in range(3):
        out, states = stack.step(x, states, weights)
    loss = out.square().sum() + weights[0][1].sum()   # W_hh of layer 0 also read directly
    torch.autograd.grad(loss, [x], retain_graph=True)
    assert all(p.grad is None for p in stack.parameters())
    assert not any(w.grads.dg for w in weights)
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in stack.parameters()]
    loss.backward()
    for p, g in zip(stack.parameters(), once):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.grad, 2 * g)
    # against the steps without the hand-over (per-step weight gradients summed by autograd)
    stack.zero_grad()
    plain = [layer.directions[0]() for layer in stack.layers]
    states = [s[0] for s in stack.zero_state(5, x)]
    for _ in range(3):
        out, states = stack.step(x, states, plain)
    (out.square().sum() + plain[0][1].sum()).backward()
    for p, g in zip(stack.parameters(), once):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def test_sequence_weights_only_where_the_cpp_training_step_runs(monkeypatch):
    """``step_weights`` hands over to the C++ training step only with autograd, on backend
    ``cpp``, outside CPU autocast; otherwise the weights as they are (decoding, the
    reference / torch backends, bf16 autocast)."""
    monkeypatch.delenv("GRNN_BACKEND", raising=False)
    stack = RecurrentStack(8, 8, num_layers=1, groups=2)
    assert stack.step_weights()[0].engine == "cpp"
    with torch.no_grad():
        assert not hasattr(stack.step_weights()[0], "engine")
    for backend in ("reference", "torch"):
        stack.layers[0].backend = backend
        assert not hasattr(stack.step_weights()[0], "engine")
    stack.layers[0].backend = None
    monkeypatch.setenv("GRNN_BACKEND", "reference")
    assert not hasattr(stack.step_weights()[0], "engine")
    monkeypatch.delenv("GRNN_BACKEND")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not hasattr(stack.step_weights()[0], "engine")


def test_outputs_outlive_later_calls():
    """Large buffers come from a pool: a result still referenced is never handed out again."""
    p, _, _ = _problem(4, 64, 40, 32, torch.float32)   # buffers of MBs: pooled
    with torch.no_grad():
        first = _run("cpp", p, None, None, True, False, grad=False)
        kept = [t.clone() for t in first]
        for seed in (1, 2):
            q, _, _ = _problem(4, 64, 40, 32, torch.float32, seed=seed)
            _run("cpp", q, None, None, True, False, grad=False)
    for a, b_ in zip(kept, first):
        assert torch.equal(a, b_)


def test_in_place_change_of_output_fails_backward():
    p, _, _ = _problem(2, 4, 4, 2, torch.float64)
    out, _ = engine.scan(p["gx"], (p["h0"], p["c0"]), p["w_hh"], p["b_hh"], "lstm",
                         backend="cpp")
    with pytest.raises(RuntimeError, match="inplace"):
        out.mul_(2)
        out.sum().backward()


def test_dispatch(monkeypatch):
    monkeypatch.delenv("GRNN_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert engine.resolve_backend(None, "lstm", cpu, torch.float32) == "cpp"
    assert engine.resolve_backend("auto", "lstm", cpu, torch.float64) == "cpp"
    assert engine.resolve_backend("auto", "lstm", cpu, torch.bfloat16) == "torch"
    assert engine.resolve_backend("cpp", "lstm", cpu, torch.bfloat16) == "torch"
    assert engine.resolve_backend("torch", "lstm", cpu, torch.float32) == "torch"
    for cell in ("gru", "rnn"):  # cpp covers them; torch does not
        assert engine.resolve_backend(None, cell, cpu, torch.float32) == "cpp"
        assert engine.resolve_backend("cpp", cell, cpu, torch.float64) == "cpp"
        assert engine.resolve_backend("cpp", cell, cpu, torch.bfloat16) == "reference"
        assert engine.resolve_backend("auto", cell, cpu, torch.bfloat16) == "reference"
        assert engine.resolve_backend("torch", cell, cpu, torch.float32) == "reference"
    # a backend the user forced on the wrong device is a ConfigError naming how it was chosen
    with pytest.raises(ConfigError, match="backend='cpp': the C\\+\\+ backend runs on CPU tensors"):
        engine.resolve_backend("cpp", "lstm", torch.device("cuda"), torch.float32)
    monkeypatch.setenv("GRNN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(engine, "triton_available", lambda: True)
    with pytest.raises(ConfigError, match=r"GRNN_BACKEND=triton: the Triton backend runs on CUDA "
                       r"tensors \(got cpu\); leave it unset"):
        engine.resolve_backend(None, "lstm", cpu, torch.float32)
    monkeypatch.setattr(engine, "triton_available", lambda: False)
    with pytest.raises(ConfigError, match="GRNN_BACKEND=triton: needs Triton: pip install triton"):
        engine.resolve_backend(None, "lstm", cpu, torch.float32)


def test_build_failure_falls_back_or_raises(monkeypatch):
    """auto: warn once and use ``torch``; forced: a RuntimeError naming the cause and fix."""
    error = RuntimeError("the fused CPU recurrence (C++) could not be built or loaded "
                         f"(OSError: no compiler); {cpu_rnn.FIX}")
    monkeypatch.setattr(cpu_rnn, "_ops", None)
    monkeypatch.setattr(cpu_rnn, "_error", error)
    monkeypatch.setattr(cpu_rnn, "_warned", False)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="Falling back to backend 'torch'"):
        assert engine.resolve_backend("auto", "lstm", cpu, torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # only once
        assert engine.resolve_backend("auto", "lstm", cpu, torch.float32) == "torch"
        assert engine.resolve_backend("auto", "gru", cpu, torch.float32) == "reference"
    with pytest.raises(RuntimeError, match="pip install ninja"):
        engine.resolve_backend("cpp", "lstm", cpu, torch.float32)
    monkeypatch.setenv("GRNN_BACKEND", "cpp")
    p, _, _ = _problem(2, 4, 3, 2, torch.float32)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        engine.scan(p["gx"], (p["h0"], p["c0"]), p["w_hh"], p["b_hh"], "lstm")


def test_import_does_not_build():
    code = ("import grnn_fairseq, grnn_fairseq.engine, grnn_fairseq.recurrent\n"
            "from grnn_fairseq.kernels import cpu_rnn\n"
            "assert cpu_rnn._ops is None and cpu_rnn._error is None\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]


def test_stale_build_lock_is_removed(tmp_path):
    """A process killed while compiling leaves torch's build lock behind, on which every
    later process would wait forever: a lock older than STALE_LOCK_SECONDS is removed."""
    code = ("import os, time, warnings\n"
            "from torch.utils.cpp_extension import _get_build_directory\n"
            "from grnn_fairseq.kernels import cpu_rnn\n"
            "lock = os.path.join(_get_build_directory(cpu_rnn._name(), False), 'lock')\n"
            "open(lock, 'w').close()\n"
            "old = time.time() - cpu_rnn.STALE_LOCK_SECONDS - 60\n"
            "os.utime(lock, (old, old))\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    cpu_rnn.load()\n"
            "assert any('stale build lock' in str(x.message) for x in w), [str(x.message) for x in w]\n"
            "assert not os.path.exists(lock)\n")
    # the same extension cache as the other tests (the build is reused, not redone)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_copies_of_the_source_build_in_separate_folders(tmp_path, monkeypatch):
    """torch's build file names the source by its path, so two checkouts sharing one build
    folder would rebuild at every switch (and wait on each other's lock): the build name
    depends on the path as well as on the content."""
    copy = tmp_path / "rnn_cpu.cpp"
    shutil.copyfile(cpu_rnn.SOURCE, copy)
    here = cpu_rnn._name()
    assert cpu_rnn._name() == here  # stable for one copy
    monkeypatch.setattr(cpu_rnn, "SOURCE", str(copy))
    there = cpu_rnn._name()
    assert there != here and there.startswith("grnn_rnn_cpu_")
    copy.write_bytes(copy.read_bytes() + b"\n// changed\n")
    assert cpu_rnn._name() != there  # and on the content


def _fake_ninja(folder):
    folder.mkdir()
    ninja = folder / "ninja"
    ninja.write_text("#!/bin/sh\necho 1.11.1\n")
    ninja.chmod(0o755)
    return str(ninja)


@pytest.mark.skipif(os.name != "posix", reason="fake executables as shell scripts")
def test_build_runs_the_environments_ninja(tmp_path, monkeypatch):
    """The build runs this Python environment's ninja ahead of any other on $PATH (two ninja
    versions rebuild each other's builds), keys the build's name on it, and restores $PATH
    afterwards; without one there, the first on $PATH."""
    mine = _fake_ninja(tmp_path / "scripts")
    other = _fake_ninja(tmp_path / "usr-bin")
    monkeypatch.setattr(cpu_rnn.sysconfig, "get_path",
                        lambda name: str(tmp_path / "scripts") if name == "scripts" else None)
    monkeypatch.setenv("PATH", str(tmp_path / "usr-bin"))
    assert cpu_rnn._ninja() == mine
    with cpu_rnn._ninja_first():
        assert shutil.which("ninja") == mine
    assert os.environ["PATH"] == str(tmp_path / "usr-bin")
    named_mine = cpu_rnn._name()
    os.remove(mine)
    assert cpu_rnn._ninja() == other
    with cpu_rnn._ninja_first():
        assert shutil.which("ninja") == other
    assert cpu_rnn._name() != named_mine
    mine = _fake_ninja(tmp_path / "scripts-again")
    monkeypatch.setattr(cpu_rnn.sysconfig, "get_path",
                        lambda name: str(tmp_path / "scripts-again") if name == "scripts" else None)
    monkeypatch.delenv("PATH")
    with cpu_rnn._ninja_first():
        assert os.environ["PATH"] == str(tmp_path / "scripts-again")
    assert "PATH" not in os.environ


def test_built_library_is_not_rebuilt_with_another_path(built):
    """Processes of one environment with and without its bin folder on $PATH (an activated
    venv, then ``.venv/bin/python``) load the same build: nothing is compiled again (ninja
    logs every command it runs), and neither needs a ninja on $PATH."""
    from torch.utils.cpp_extension import _get_build_directory

    if os.path.dirname(cpu_rnn._ninja() or "") != sysconfig.get_path("scripts"):
        pytest.skip("this environment's ninja is not in its scripts folder (e.g. pip --user): "
                    "a $PATH without it finds none")
    # _name() as load() computed it: torch appends its libraries (-L..., -ltorch) to the
    # extra_ldflags list it is given, so load() passes copies
    assert not [f for f in cpu_rnn.LDFLAGS if f.startswith(("-L", "-l"))], cpu_rnn.LDFLAGS
    log = os.path.join(_get_build_directory(cpu_rnn._name(), False), ".ninja_log")
    before = open(log).read()
    code = ("from grnn_fairseq.kernels import cpu_rnn\n"
            "cpu_rnn.load()\n"
            "print(cpu_rnn._name())\n")
    bin_dir = os.path.dirname(sys.executable)
    for path in (os.pathsep.join([bin_dir, "/usr/bin", "/bin"]), "/usr/bin:/bin",
                 str(bin_dir)):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PATH": path},
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, (path, r.stderr[-3000:])
        assert r.stdout.split()[-1] == cpu_rnn._name(), path
        assert open(log).read() == before, f"rebuilt with PATH={path}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_takes_the_groups_gx_apart(built, cell, dtype):
    """The C++ forward given gx as the K groups' [T, B, Gm] tensors (how oneDNN returns the
    projections) computes what it computes from one [T, K, B, Gm] tensor: views of one
    tensor, separate tensors, and separate tensors with strides of their own (copied);
    parts of different shapes or dtypes are refused by name."""
    p, mask, _ = _problem(4, 16, 5, 3, dtype, padding=True, cell=cell)
    gx = p["gx"].detach()
    rest = [p["h0"].detach(), p["c0"].detach() if cell == "lstm" else None,
            p["w_hh"].detach(), p["b_hh"].detach(), mask, True, False, True,
            cpu_rnn.CELL_IDS[cell]]
    want = built.forward([gx], *rest)
    odd = [g.transpose(0, 1).contiguous().transpose(0, 1) if i % 2 else g.contiguous()
           for i, g in enumerate(gx.unbind(1))]  # [B, T, Gm] storage for odd groups
    assert not odd[1].is_contiguous() and odd[0].is_contiguous()
    for parts in (list(gx.unbind(1)), [g.contiguous() for g in gx.unbind(1)], odd):
        got = built.forward(parts, *rest)
        for a, b in zip(got[:3], want[:3], strict=True):  # out, h_T, c_T (fac, hs: buffers)
            assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"K tensors \[T, B, Gm\] of one shape"):
        built.forward([g[:, :2] if i == 3 else g for i, g in enumerate(gx.unbind(1))],
                      *rest)
    with pytest.raises(RuntimeError, match="gx's groups must be CPU tensors of one dtype"):
        built.forward([g.half() if i == 1 else g for i, g in enumerate(gx.unbind(1))], *rest)


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_backward_writes_the_gate_gradients_transposed(built, cell, dtype, reverse, unit,
                                                       monkeypatch):
    """With ``transposed`` the C++ backward returns, in dW_hh's place, the gate gradients
    as [S, K, Gm, T*B] (column t*B + b: step t, row b): S = 1, the GRU 2 (hidden side, then
    input side); every other output unchanged.  Against the transposes of what it returns
    without (dG [K, T*B, Gm] and d_gx), for each vector unit's register tile: 37 rows and
    Gm = 36, 27 or 9 (whole tiles and the rows and gate rows left over), padding and the
    time shuffle on."""
    if UNITS.index(unit) > UNITS.index(built.detected_isa()):
        pytest.skip(f"this CPU has no {unit} (its widest unit: {built.detected_isa()})")
    monkeypatch.setenv("GRNN_CPU_ISA", unit)
    k, m, t_len, b = 3, 9, 4, 37
    p, mask, _ = _problem(k, m, t_len, b, dtype, padding=True, cell=cell)
    lstm = cell == "lstm"
    _, _, _, fac, hs = built.forward(
        [p["gx"].detach()], p["h0"].detach(), p["c0"].detach() if lstm else None,
        p["w_hh"].detach(), p["b_hh"].detach(), mask, True, reverse, True,
        cpu_rnn.CELL_IDS[cell])
    g = torch.Generator().manual_seed(5)
    d_out = torch.randn(t_len, b, k * m, generator=g, dtype=dtype)
    d_h = torch.randn(k, b, m, generator=g, dtype=dtype)
    args = [fac, hs, p["w_hh"].detach(), mask, d_out, d_h, d_h.flip(1) if lstm else None,
            True, reverse, cpu_rnn.CELL_IDS[cell], False]
    plain = built.backward(*args)
    got = built.backward(*args, True)
    gm, n = p["w_hh"].shape[1], t_len * b
    sides = [plain[3].transpose(1, 2)]  # dG [K, T*B, Gm] -> [K, Gm, T*B]
    if cell == "gru":  # d_gx [T, K, B, Gm] -> [K, Gm, T*B]
        sides.append(plain[0].permute(1, 3, 0, 2).reshape(k, gm, n))
    want = torch.stack(sides)
    assert got[3].shape == (len(sides), k, gm, n) and got[3].is_contiguous()
    # every step's columns hold gradients (padded rows: zeros)
    assert want.view(-1, t_len, b).abs().amax(dim=(0, 2)).min() > 0
    assert torch.equal(got[3], want)
    for i in (0, 1, 2, 4):
        assert torch.equal(got[i], plain[i]), i
    with pytest.raises(RuntimeError, match="weight_grad and transposed exclude each other"):
        built.backward(*args[:-1], True, True)


def test_bad_cell_id_is_refused(built):
    """The ops' ``cell`` argument outside 0-2 fails with a message naming the valid ones."""
    p, _, _ = _problem(2, 4, 3, 2, torch.float64)
    with pytest.raises(RuntimeError, match=r"cell 3 is not 0 \(LSTM\), 1 \(GRU\) or 2 \(RNN\)"):
        built.forward([p["gx"].detach()], p["h0"].detach(), p["c0"].detach(),
                      p["w_hh"].detach(), p["b_hh"].detach(), None, True, False, False, 3)
