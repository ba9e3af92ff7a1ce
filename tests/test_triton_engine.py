"""The Triton LSTM, GRU and Elman RNN kernels against the reference engine.

Without a GPU the kernels run through Triton's interpreter on CPU tensors and tiny sizes;
there the persistent scans run as one program that walks every tile (barrier trivially
met).  For every cell, outputs, final states and every gradient (x and W_ih through the
input projection, W_hh, both biases, the initial state) are compared for K in {1, 4},
with and without the time-step shuffle, with and without padding, in both directions; the
fused decoding step against the reference step.  On a GPU (scripts/gpu-checks.sh kernels)
the same tests run compiled, plus grids of many programs meeting at the time-step
barriers.
"""
import copy
import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
KERNELS = "grnn_fairseq.kernels.triton_rnn"
# Triton picks the interpreter when a function is decorated, its own helpers (tl.zeros, ...)
# included: the variable must be set before Triton is first imported.
_SET_INTERPRET = not CUDA and "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton); "
                                               "the fused GPU kernels cannot be tested")
if not CUDA:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.zeros, InterpretedFunction):
        pytest.skip("no GPU, and Triton was imported without TRITON_INTERPRET=1 before this "
                    "module: run it with TRITON_INTERPRET=1 (or on its own)",
                    allow_module_level=True)

from attention_cases import (  # noqa: E402
    attention_inputs, attention_reference, check_sequence_of_positions, left_padding,
    rnnsearch_training_both_ways)
from grnn_fairseq import engine  # noqa: E402
from grnn_fairseq.cells import GATES  # noqa: E402
from grnn_fairseq.recurrent import RecurrentStack  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def triton_mode():
    """On CPU: the kernels through the interpreter (re-decorated if imported before)."""
    if CUDA:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    if KERNELS in sys.modules:
        importlib.reload(sys.modules[KERNELS])
    else:
        importlib.import_module(KERNELS)
    yield
    if _SET_INTERPRET or old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


CELLS = list(GATES)
CELL_OF_GATES = {g: c for c, g in GATES.items()}


def _problem(k, m, t_len, b, i_size, padding, seed=0, cell="lstm"):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_()

    gm = GATES[cell] * m
    p = dict(
        x=rand(t_len * b, i_size),
        w_ih=rand(k, gm, i_size // k, scale=0.5), b_ih=rand(k, gm, scale=0.5),
        w_hh=rand(k, gm, m, scale=0.5), b_hh=rand(k, gm, scale=0.5),
        h0=rand(k, b, m),
    )
    if cell == "lstm":
        p["c0"] = rand(k, b, m)
    mask = None
    if padding:
        mask = torch.ones(t_len, b, dtype=torch.bool)
        mask[t_len - 2:, 0] = False   # right padding
        mask[:2, b - 1] = False       # left padding
        mask = mask.to(DEVICE)
    upstream = [torch.randn(t_len, k, b, m, generator=g).to(DEVICE),
                torch.randn(k, b, m, generator=g).to(DEVICE),
                torch.randn(k, b, m, generator=g).to(DEVICE)]
    return p, mask, upstream


def _run(backend, p, mask, upstream, shuffle, reverse, t_len, b):
    k, gm, m = p["w_hh"].shape
    cell = CELL_OF_GATES[gm // m]
    gx = engine.project_input(p["x"], p["w_ih"], p["b_ih"]).view(k, t_len, b, -1).transpose(0, 1)
    init = (p["h0"], p["c0"]) if cell == "lstm" else (p["h0"],)
    out, final = engine.scan(gx, init, p["w_hh"], p["b_hh"], cell,
                             time_shuffle=shuffle, mask=mask, reverse=reverse, backend=backend)
    loss = sum((a * w).sum() for a, w in zip((out,) + final, upstream))
    names = list(p)
    grads = torch.autograd.grad(loss, [p[n] for n in names])
    return {"out": out, **{f"state_T[{i}]": s for i, s in enumerate(final)},
            **{"d_" + n: gr for n, gr in zip(names, grads)}}


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["noshuffle", "shuffle"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("cell", CELLS)
def test_scan_matches_reference(cell, k, shuffle, padding, reverse):
    m, t_len, b = 4, 5, 3
    p, mask, upstream = _problem(k, m, t_len, b, i_size=8, padding=padding, cell=cell)
    ref = _run("reference", p, mask, upstream, shuffle, reverse, t_len, b)
    got = _run("triton", p, mask, upstream, shuffle, reverse, t_len, b)
    assert len(ref) == (10 if cell == "lstm" else 8)  # every output and gradient compared
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cell", CELLS)
def test_tiles_uneven_widths_and_batch(cell):
    """m not a multiple of K (the shuffle crosses groups unevenly), several batch and unit
    tiles (B > BLOCK_B, m > BLOCK_J), padding, reverse."""
    k, m, t_len, b = 2, 40, 3, 37
    p, mask, upstream = _problem(k, m, t_len, b, i_size=6, padding=True, seed=1, cell=cell)
    ref = _run("reference", p, mask, upstream, True, True, t_len, b)
    got = _run("triton", p, mask, upstream, True, True, t_len, b)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=5e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cell", CELLS)
def test_stack_bidirectional_padded_matches_reference(cell):
    torch.manual_seed(0)
    ref = RecurrentStack(8, 8, num_layers=2, cell=cell, groups=2, bidirectional=True,
                         backend="reference")
    fused = RecurrentStack(8, 8, num_layers=2, cell=cell, groups=2, bidirectional=True,
                           backend="triton")
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    x = torch.randn(4, 3, 8, device=DEVICE, requires_grad=True)
    pad = torch.zeros(4, 3, dtype=torch.bool, device=DEVICE)
    pad[3:, 1] = True
    outs = []
    for stack in (ref, fused):
        out, state = stack(x, padding_mask=pad)
        state = state if cell == "lstm" else (state,)
        loss = out.square().sum() + sum(s.sum() for s in state)
        grads = torch.autograd.grad(loss, [x] + list(stack.parameters()))
        outs.append((out,) + state + grads)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", CELLS)
def test_inference_path_matches_reference(cell):
    k, m, t_len, b = 4, 4, 4, 2
    p, mask, _ = _problem(k, m, t_len, b, i_size=8, padding=True, cell=cell)
    init = (p["h0"], p["c0"]) if cell == "lstm" else (p["h0"],)
    with torch.no_grad():
        gx = engine.project_input(p["x"], p["w_ih"], p["b_ih"]).view(k, t_len, b, -1).transpose(0, 1)
        res = [engine.scan(gx, init, p["w_hh"], p["b_hh"], cell, True, mask, backend=be)
               for be in ("reference", "triton")]
    (o1, s1), (o2, s2) = res
    assert len(s1) == len(s2) == len(init)
    for a, b_ in zip((o1,) + s1, (o2,) + s2):
        torch.testing.assert_close(b_, a, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rearr", ["none", "time", "both"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("cell", CELLS)
def test_decode_step_matches_reference(cell, k, rearr):
    """The fused decoding step (input projection + shuffled recurrent product + cell, one
    launch per layer) against the reference step: 2 layers, several batch and unit tiles
    (B = 37 > BLOCK_B, m = 40 > BLOCK_J), three steps so that the states feed back."""
    torch.manual_seed(k)
    width, b = 40 * k, 37
    ref = RecurrentStack(width, width, num_layers=2, cell=cell, groups=k, rearrangement=rearr,
                         backend="reference")
    fused = RecurrentStack(width, width, num_layers=2, cell=cell, groups=k,
                           rearrangement=rearr, backend="triton")
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    xs = torch.randn(3, b, width, device=DEVICE)
    start = [tuple(torch.randn_like(t) for t in s[0]) for s in ref.zero_state(b, xs)]
    results = []
    with torch.no_grad():
        for stack in (ref, fused):
            states = start
            outs = []
            for x in xs:
                out, states = stack.step(x, states)
                outs.append(out)
            results.append((torch.stack(outs), states))
    (o_ref, s_ref), (o_fused, s_fused) = results
    torch.testing.assert_close(o_fused, o_ref, atol=2e-5, rtol=1e-4)
    for a, b_ in zip(s_ref, s_fused):
        for x, y in zip(a, b_):
            torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4)


# Triton's interpreter computes tl.dot on bfloat16 wrongly (numpy has no bfloat16): bf16
# is checked compiled, on a GPU
HALF = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="the Triton interpreter's bf16 tl.dot is wrong; bf16 runs on a GPU"))]


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
def test_half_precision_matches_reference(cell, dtype):
    """Half-precision scans (forward and backward) and decoding steps against the fp32
    reference, within half-precision tolerance."""
    torch.manual_seed(0)
    ref = RecurrentStack(32, 32, num_layers=2, cell=cell, groups=2, bidirectional=True,
                         backend="reference").to(DEVICE)
    half = RecurrentStack(32, 32, num_layers=2, cell=cell, groups=2, bidirectional=True,
                          backend="triton").to(DEVICE)
    half.load_state_dict(ref.state_dict())
    half = half.to(dtype)
    x = torch.randn(6, 20, 32, device=DEVICE)
    pad = torch.zeros(6, 20, dtype=torch.bool, device=DEVICE)
    pad[4:, :5] = True
    results = []
    for stack, xi in ((ref, x), (half, x.to(dtype))):
        xi = xi.detach().requires_grad_()
        out, _ = stack(xi, padding_mask=pad)
        (out.float().square().sum()).backward()
        results.append((out.float(), xi.grad.float()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=3e-2, rtol=3e-2)
    uni_ref = RecurrentStack(32, 32, num_layers=2, cell=cell, groups=4,
                             backend="reference").to(DEVICE)
    uni = RecurrentStack(32, 32, num_layers=2, cell=cell, groups=4, backend="triton").to(DEVICE)
    uni.load_state_dict(uni_ref.state_dict())
    uni = uni.to(dtype)
    states = [s[0] for s in uni_ref.zero_state(20, x)]
    with torch.no_grad():
        s_ref, s_half = states, [tuple(t.to(dtype) for t in s) for s in states]
        for x_t in x:
            o_ref, s_ref = uni_ref.step(x_t, s_ref)
            o_half, s_half = uni.step(x_t.to(dtype), s_half)
            assert o_half.dtype == dtype
            torch.testing.assert_close(o_half.float(), o_ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
def test_decode_step_under_autocast(cell, dtype):
    """fairseq's --amp: the fused step runs in autocast's dtype (as the reference step
    does) and returns states in it."""
    torch.manual_seed(0)
    ref = RecurrentStack(16, 16, num_layers=1, cell=cell, groups=2, backend="reference")
    fused = RecurrentStack(16, 16, num_layers=1, cell=cell, groups=2, backend="triton")
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    x = torch.randn(20, 16, device=DEVICE)
    states = [s[0] for s in ref.zero_state(20, x)]
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype):
        (o_ref, s_ref), (o_fused, s_fused) = ref.step(x, states), fused.step(x, states)
    assert o_fused.dtype == dtype and all(s.dtype == dtype for s in s_fused[0])
    torch.testing.assert_close(o_fused.float(), o_ref.float(), atol=2e-2, rtol=2e-2)
    for got, want in zip(s_fused[0], s_ref[0]):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_decode_step_is_one_launch(monkeypatch):
    """The triton backend really takes the fused step (not the torch step) for every cell
    without autograd; with autograd the training step where GRNN_TRITON_TRAIN_STEP is on,
    and the separate autograd ops otherwise."""
    from grnn_fairseq.kernels import triton_rnn

    calls, train_calls = [], []
    real, real_train = triton_rnn.step_triton, triton_rnn.step_triton_train
    monkeypatch.setattr(triton_rnn, "step_triton",
                        lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    monkeypatch.setattr(triton_rnn, "step_triton_train",
                        lambda *a, **kw: train_calls.append(a[0]) or real_train(*a, **kw))
    x = torch.randn(3, 8, device=DEVICE)
    for on in ("0", "1"):
        monkeypatch.setitem(triton_rnn.VARIANT, "train_step", on)
        for cell in ("lstm", "gru", "rnn"):
            stack = RecurrentStack(8, 8, num_layers=2, cell=cell, groups=2,
                                   backend="triton").to(DEVICE)
            states = [s[0] for s in stack.zero_state(3, x)]
            with torch.no_grad():
                stack.step(x, states)
            stack.step(x, states)  # autograd on: the differentiable step
    assert calls == ["lstm", "lstm", "gru", "gru", "rnn", "rnn"] * 2
    assert train_calls == ["lstm", "lstm", "gru", "gru", "rnn", "rnn"]
    monkeypatch.setitem(triton_rnn.VARIANT, "train_step", "yes")
    with torch.no_grad():
        stack.step(x, states)   # the variant is read only where it could apply
    with pytest.raises(ValueError, match="GRNN_TRITON_TRAIN_STEP='yes': expected 0 or 1"):
        stack.step(x, states)


def _steps_with_grad(stack, xs, start, upstream, sequence=False):
    """Run ``stack.step`` over xs with autograd from the states ``start`` -> (outputs,
    final states, gradients of x, every parameter and the initial states) of the loss
    sum(outputs * upstream[0]) + sum(final states * upstream[1:]).  sequence: the steps
    take ``stack.step_weights()`` (as RNNSearch's decoder does), and the loss also has a
    term of the first layer's weights themselves, so they have gradients from elsewhere
    too (0.01 * the sum of their squares)."""
    states = [tuple(t.detach().clone().requires_grad_() for t in s) for s in start]
    xs = xs.detach().requires_grad_()
    weights = stack.step_weights() if sequence else None
    cur, outs = states, []
    for x in xs:
        out, cur = stack.step(x, cur, weights)
        outs.append(out)
    out = torch.stack(outs)
    loss = (out * upstream[0]).sum()
    for s in cur:
        loss = loss + sum((t * u).sum() for t, u in zip(s, upstream[1:]))
    if sequence:
        loss = loss + 0.01 * sum(w.float().square().sum() for w in weights[0])
    inputs = [xs] + list(stack.parameters()) + [t for s in states for t in s]
    return out, cur, torch.autograd.grad(loss, inputs)


TRAIN_STEP_CASES = ([("lstm", 1, "none", 0.0), ("lstm", 4, "both", 0.0),
                     ("lstm", 4, "time", 0.0), ("lstm", 4, "layer", 0.0),
                     ("lstm", 2, "both", 0.5)]
                    + [(cell, k, rearr, 0.0) for cell in ("gru", "rnn")
                       for k, rearr in ((1, "none"), (4, "both"), (4, "layer"))])


@pytest.mark.parametrize("cell, k, rearr, rate", TRAIN_STEP_CASES,
                         ids=["{}-K{}-{}-r{}".format(*c) for c in TRAIN_STEP_CASES])
def test_training_step_matches_reference(monkeypatch, cell, k, rearr, rate):
    """The training step (GRNN_TRITON_TRAIN_STEP=1: the fused step with its own backward)
    of every cell against the reference step's autograd: outputs, final states and the
    gradients of the input, every weight and bias (the restricted pool's too) and the
    initial states; 2 layers, 3 steps (the states feed back, and their gradients flow
    through every step), several batch and unit tiles (B = 37, m = 40), every
    rearrangement.  The training step must have run at every layer and step.  Both ways
    of giving it the weights: per step (each step's weight gradients summed by autograd),
    and ``step_weights()`` for the sequence (every step handing its part over to one
    product per weight after the last; the weights with gradients from elsewhere too)."""
    from grnn_fairseq.kernels import triton_rnn

    monkeypatch.setitem(triton_rnn.VARIANT, "train_step", "1")
    calls = []
    real = triton_rnn._TritonStep.apply
    monkeypatch.setattr(triton_rnn._TritonStep, "apply",
                        lambda *a: calls.append(a[:2] + (a[2] is not None,)) or real(*a))
    torch.manual_seed(k)
    width, b = 40 * k, 37
    ref = RecurrentStack(width, width, num_layers=2, cell=cell, groups=k, rearrangement=rearr,
                         sharing_rate=rate, backend="reference").to(DEVICE)
    fused = RecurrentStack(width, width, num_layers=2, cell=cell, groups=k,
                           rearrangement=rearr, sharing_rate=rate, backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    xs = torch.randn(3, b, width, device=DEVICE)
    start = [tuple(torch.randn_like(t) for t in s[0]) for s in ref.zero_state(b, xs)]
    upstream = [torch.randn(3, b, width, device=DEVICE)] + [
        torch.randn(k, b, width // k, device=DEVICE) for _ in range(2)]
    time_shuffle = k > 1 and rearr in ("time", "both")
    layer_shuffle = k > 1 and rearr in ("layer", "both")  # the lower layer's out, rearranged
    states = ["h0", "c0", "h0'", "c0'"] if cell == "lstm" else ["h0", "h0'"]
    names = ["x"] + [n for n, _ in ref.named_parameters()] + states
    for sequence in (False, True):
        calls.clear()
        (o_ref, s_ref, g_ref), (o_fused, s_fused, g_fused) = (
            _steps_with_grad(stack, xs, start, upstream, sequence) for stack in (ref, fused))
        assert calls == [(cell, (time_shuffle, layer_shuffle), sequence),
                         (cell, (time_shuffle, False), sequence)] * 3
        torch.testing.assert_close(o_fused, o_ref, atol=2e-5, rtol=1e-4)
        for a, b_ in zip(s_ref, s_fused):
            for x, y in zip(a, b_):
                torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4)
        assert len(g_ref) == len(names)
        for name, a, b_ in zip(names, g_ref, g_fused):
            torch.testing.assert_close(b_, a, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"sequence={sequence}, {name}: {m}")


def test_sequence_weights_gradients_per_backward(monkeypatch):
    """Each backward through the steps of a sequence computes the weight gradients of its
    own steps once: a second backward through the same graph (retain_graph) adds the
    same gradients again, and nothing of the first is counted twice; a backward that
    does not ask for the weights' gradients (autograd.grad of the input) leaves nothing
    behind for the next."""
    from grnn_fairseq.kernels import triton_rnn

    monkeypatch.setitem(triton_rnn.VARIANT, "train_step", "1")
    torch.manual_seed(0)
    stack = RecurrentStack(16, 16, num_layers=2, groups=2, backend="triton").to(DEVICE)
    weights = stack.step_weights()
    assert all(w.grads is not None for w in weights)
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    states = [s[0] for s in stack.zero_state(5, x)]
    for _ in range(3):
        out, states = stack.step(x, states, weights)
    torch.autograd.grad(out.square().sum(), [x], retain_graph=True)
    assert all(p.grad is None for p in stack.parameters())
    out.square().sum().backward(retain_graph=True)
    once = [p.grad.clone() for p in stack.parameters()]
    out.square().sum().backward()
    for p, g in zip(stack.parameters(), once):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.grad, 2 * g)


@pytest.mark.parametrize("cell", CELLS)
def test_training_step_reads_gradients_through_their_strides(cell):
    """Autograd hands the step's backward gradients of any layout (the unshuffled gradient
    of the next step is a permuted view): gradients of out, h_t (and c_t) that are strided
    views give the reference step's gradients, with and without the time shuffle, and
    with out in the order of the rearrangement between layers (out_shuffle)."""
    from grnn_fairseq.kernels import triton_rnn
    from grnn_fairseq.rearrangement import rearrange
    from grnn_fairseq.recurrent import from_grouped

    k, m, b = 4, 8, 5
    p, _, _ = _problem(k, m, 1, b, i_size=12, padding=False, cell=cell)
    d_out = torch.randn(k * m, b, device=DEVICE).t()                  # strides (1, B)
    d_h = torch.randn(b, m, k, device=DEVICE).permute(2, 0, 1)        # (1, m*K, K): unshuffled
    d_c = torch.randn(m, k, b, device=DEVICE).permute(1, 2, 0)        # (B, 1, K*B)
    assert not any(t.is_contiguous() for t in (d_out, d_h, d_c))
    assert 1 not in (d_out.stride(1), d_h.stride(2), d_c.stride(2))  # no unit stride by unit
    names = ["x", "w_ih", "b_ih", "w_hh", "b_hh", "h0"] + (["c0"] if cell == "lstm" else [])
    inputs = [p[n] for n in names]
    upstream = [d_out, d_h, d_c][:len(names) - 4]
    for shuffle, out_shuffle in ((False, False), (True, False), (True, True), (False, True)):
        gx = engine.project_input(p["x"], p["w_ih"], p["b_ih"])
        h, state = engine.recurrent_step(gx, tuple(inputs[5:]), p["w_hh"].transpose(1, 2),
                                         p["b_hh"].unsqueeze(1), cell, shuffle,
                                         backend="reference")
        out = rearrange(from_grouped(h), k) if out_shuffle else from_grouped(h)
        want_out = out.detach()
        want = torch.autograd.grad([out] + list(state), inputs, upstream)
        outs = triton_rnn._TritonStep.apply(cell, (shuffle, out_shuffle), None, *inputs)
        torch.testing.assert_close(outs[0], want_out, atol=1e-5, rtol=1e-5)
        got = torch.autograd.grad(list(outs), inputs, upstream)
        for name, a, b_ in zip(names, want, got):
            torch.testing.assert_close(
                b_, a, atol=1e-4, rtol=1e-4,
                msg=lambda msg: f"shuffle={shuffle}, out_shuffle={out_shuffle}, {name}: {msg}")


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
def test_training_step_half_precision_and_autocast(monkeypatch, cell, dtype):
    """The training step in half precision (weights and states in ``dtype``) and under
    autocast (fp32 parameters, fairseq's --amp: the step runs in autocast's dtype and the
    gradients reach the fp32 parameters in fp32), against the fp32 reference."""
    from grnn_fairseq.kernels import triton_rnn

    monkeypatch.setitem(triton_rnn.VARIANT, "train_step", "1")
    torch.manual_seed(0)
    ref = RecurrentStack(32, 32, num_layers=2, cell=cell, groups=4,
                         backend="reference").to(DEVICE)
    fused = RecurrentStack(32, 32, num_layers=2, cell=cell, groups=4,
                           backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    xs = torch.randn(4, 20, 32, device=DEVICE)
    start = [tuple(torch.randn_like(t) * 0.5 for t in s[0]) for s in ref.zero_state(20, xs)]
    upstream = [torch.randn(4, 20, 32, device=DEVICE)] + [
        torch.randn(4, 20, 8, device=DEVICE) for _ in range(2)]
    for sequence in (False, True):   # the weights per step, or for the sequence
        o_ref, _, g_ref = _steps_with_grad(ref, xs, start, upstream, sequence)
        with torch.autocast(DEVICE, dtype=dtype):
            o_amp, _, g_amp = _steps_with_grad(fused, xs, start, upstream, sequence)
        assert o_amp.dtype == dtype
        assert all(g.dtype == torch.float32 for g in g_amp)
        half = copy.deepcopy(fused).to(dtype)
        o_half, _, g_half = _steps_with_grad(
            half, xs.to(dtype), [tuple(t.to(dtype) for t in s) for s in start],
            [u.to(dtype) for u in upstream], sequence)
        assert all(g.dtype == dtype for g in g_half)
        for out, grads in ((o_amp, g_amp), (o_half, g_half)):
            torch.testing.assert_close(out.float(), o_ref, atol=3e-2, rtol=3e-2)
            for a, b_ in zip(g_ref, grads):
                scale = a.abs().max().clamp(min=1.0)
                torch.testing.assert_close(b_.float() / scale, a / scale, atol=3e-2,
                                           rtol=3e-2)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnnsearch_trains_with_the_training_step(monkeypatch, cell):
    """RNNSearch on the triton backend (encoder: the persistent scans; decoder, trained
    step by step: the training step at every layer and target position, with the weight
    gradients computed once for the sequence) gives the reference backend's loss and
    gradients."""
    from test_models import build_mt, prev_tokens, source_batch

    from grnn_fairseq.kernels import triton_rnn

    monkeypatch.setitem(triton_rnn.VARIANT, "train_step", "1")
    calls = []
    real = triton_rnn._TritonStep.apply
    monkeypatch.setattr(triton_rnn._TritonStep, "apply",
                        lambda *a: calls.append(a[2] is not None) or real(*a))
    _, src, lengths = source_batch()
    prev = prev_tokens(src.shape[0], 5)
    results = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("GRNN_BACKEND", backend)
        model = build_mt(cell=cell, groups=2).to(DEVICE)
        logits, _ = model(src.to(DEVICE), lengths.to(DEVICE), prev.to(DEVICE))
        loss = torch.log_softmax(logits, -1).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert calls == [True] * 2 * 5   # decoder layers x target positions, triton only
    _assert_same_training(*results)


def _assert_same_training(want, got):
    """Two (loss, {parameter name: gradient}) agree."""
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)
    assert want[1].keys() == got[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- attention
def _attention_inputs(s, n, e, a, v, dtype, seed=0):
    return attention_inputs(s, n, e, a, v, dtype, DEVICE, seed)


def _left_padding(s, n, lengths):
    return left_padding(s, n, lengths, DEVICE)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("s,n,e,lengths", [
    (7, 3, 1, None),            # no mask
    (37, 3, 1, (37, 2, 18)),    # blocks of 16 sources: whole blocks of pads, left padding
    (5, 2, 3, (5, 1)),          # beam search: 3 rows per source (no keys' gradient)
])
def test_fused_attention_matches_reference(s, n, e, lengths, dtype, tol):
    """One position's fused attention (kernels/triton_attention.py) against the formula in
    float64: context, weights, and the gradients of the query, the keys (with one row per
    source), v and the values, from a loss on the context and on the weights.  The
    attention width 70 and value width 67 span two blocks of 64."""
    from grnn_fairseq.kernels.triton_attention import attention_triton

    q, keys, v, values = _attention_inputs(s, n, e, 70, 67, dtype)
    if e > 1:
        keys.requires_grad_(False)
    mask = _left_padding(s, n, lengths) if lengths else None
    context, alpha = attention_triton(q, keys, v, values, mask, e)
    want_c, want_a = attention_reference(q, keys, v, values, mask, e)
    assert context.dtype == dtype and alpha.dtype == torch.float32
    torch.testing.assert_close(context.double(), want_c, atol=tol, rtol=tol)
    torch.testing.assert_close(alpha.double(), want_a, atol=tol, rtol=tol)
    if mask is not None:
        assert (alpha[mask.repeat_interleave(e, 1)] == 0).all()
    g = torch.Generator().manual_seed(1)
    d_c, d_a = torch.randn(want_c.shape, generator=g), torch.randn(want_a.shape, generator=g)
    names, inputs = zip(*[(name, t) for name, t in zip(("q", "keys", "v", "values"),
                                                       (q, keys, v, values)) if t.requires_grad])

    def grads(c, a):
        loss = (c.double() * d_c.to(DEVICE)).sum() + (a.double() * d_a.to(DEVICE)).sum()
        return torch.autograd.grad(loss, inputs)

    for name, got, want in zip(names, grads(context, alpha), grads(want_c, want_a)):
        torch.testing.assert_close(got.double(), want.double(), atol=10 * tol, rtol=10 * tol,
                                   msg=lambda m: f"d {name}: {m}")


def test_fused_attention_refuses_a_keys_gradient_over_shared_rows():
    from grnn_fairseq.kernels.triton_attention import attention_triton

    q, keys, v, values = _attention_inputs(4, 2, 3, 5, 6, torch.float32)
    context, _ = attention_triton(q, keys, v, values, None, 3)
    with pytest.raises(ValueError, match="one query row per source, got 3"):
        context.sum().backward()


def test_fused_attention_sums_a_sequence_of_positions(monkeypatch):
    """Several target positions over the same keys and values, their gradients summed once
    (``sequence_keys`` in place, v's too, and ``sequence_values``), against the float64
    formula per position, with gradients of the keys, v and the values from elsewhere
    too; a backward of the queries only leaves nothing behind, and two full backwards
    through the retained graph give exactly twice one."""
    from grnn_fairseq.kernels import triton_attention

    check_sequence_of_positions(triton_attention, torch.float32, DEVICE, 1e-5, monkeypatch)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnnsearch_trains_with_fused_attention(monkeypatch, cell):
    """RNNSearch on the triton backend with GRNN_TRITON_ATTENTION=1 (and the fused
    training step): the fused attention at every target position, its keys' and values'
    gradients summed once, and the same loss and gradients as PyTorch's attention."""
    from test_models import build_mt

    from grnn_fairseq.kernels import triton_attention, triton_rnn

    monkeypatch.setenv("GRNN_BACKEND", "triton")
    monkeypatch.setitem(triton_rnn.VARIANT, "train_step", "1")
    calls, results = rnnsearch_training_both_ways(
        triton_attention, lambda: build_mt(cell=cell, groups=2).to(DEVICE), monkeypatch, DEVICE)
    assert calls == [True] * 5  # every target position, with both sums
    _assert_same_training(*results)


@pytest.mark.skipif(CUDA, reason="the graphs' recorder here is the CPU's fake one")
def test_beam_search_with_fused_attention(monkeypatch):
    """fairseq's beam search (several rows per source, left padding, a shrinking batch),
    eager and from decode graphs, with the fused attention: the hypotheses of PyTorch's
    attention on the same backend."""
    from test_decode_graphs import assert_same_hypotheses, beam_search, with_graphs
    from test_models import _model_with_varied_lengths, source_batch

    from grnn_fairseq.kernels import triton_attention

    _, src, lengths = source_batch((7, 3, 5, 2, 9, 4), seed=5)
    model = _model_with_varied_lengths("lstm", 2, 0.0, src, lengths, 8).float()
    monkeypatch.setenv("GRNN_BACKEND", "triton")
    want = beam_search(model, src, lengths, 8, beam=3)
    calls, real = [], triton_attention.forward
    monkeypatch.setattr(triton_attention, "forward", lambda *a: calls.append(a[5]) or real(*a))
    monkeypatch.setitem(triton_attention.VARIANT, "attention", "1")
    assert_same_hypotheses(beam_search(model, src, lengths, 8, beam=3), want, 1e-4)
    assert 3 in calls  # beam search's rows: 3 per source
    with_graphs(model, monkeypatch)
    n_eager = len(calls)
    assert_same_hypotheses(beam_search(model, src, lengths, 8, beam=3), want, 1e-4)
    assert len(calls) > n_eager


def test_fused_attention_switch(monkeypatch):
    from grnn_fairseq.attention import fused
    from grnn_fairseq.kernels import triton_attention

    keys = torch.zeros(2, 2, 4, device=DEVICE)
    monkeypatch.setitem(triton_attention.VARIANT, "attention", "yes")
    with pytest.raises(ValueError, match="GRNN_TRITON_ATTENTION='yes': expected 0 or 1"):
        fused(keys)
    monkeypatch.setitem(triton_attention.VARIANT, "attention", "1")
    monkeypatch.setenv("GRNN_BACKEND", "triton")
    assert fused(keys)
    monkeypatch.setenv("GRNN_BACKEND", "torch")
    assert not fused(keys)  # only where the recurrence runs on Triton


def test_unknown_cell_or_dtype_is_refused():
    from grnn_fairseq.kernels import triton_rnn

    p, _, _ = _problem(2, 4, 3, 2, i_size=4, padding=False)
    args = (torch.zeros(2, 4, device=DEVICE), (p["h0"].detach(), p["c0"].detach()),
            p["w_ih"].detach(), p["b_ih"].detach(), p["w_hh"].detach(), p["b_hh"].detach())
    with pytest.raises(ValueError, match="cover the cells .* not 'elman'"):
        triton_rnn.step_triton("elman", *args)
    with pytest.raises(TypeError, match="support .* got torch.float64"):
        triton_rnn.step_triton("lstm", *(a.double() if torch.is_tensor(a) else a for a in args))


def test_tuning_knobs_reject_bad_values(monkeypatch):
    from grnn_fairseq.kernels import triton_rnn

    for bad in ("32,16", "32,16,64", "32,15,64,4", "a,b,c,d", "32,16,64,3"):
        with pytest.raises(ValueError, match="GRNN_TRITON_BLOCKS"):
            triton_rnn._parse_blocks(bad)
    assert triton_rnn._parse_blocks("16,32,64,8") == (16, 32, 64, 8)
    monkeypatch.setattr(triton_rnn, "_FORCED_BLOCKS", "16,16")
    with pytest.raises(ValueError, match="four integers"):
        triton_rnn._blocks.__wrapped__(64, 64, 4, 132)
    for bad in ("0", "-2", "x"):
        with pytest.raises(ValueError, match="GRNN_TRITON_PROGRAMS"):
            triton_rnn._parse_programs(bad)
    with pytest.raises(ValueError, match="GRNN_TRITON_POLL='spin': expected one of atomic"):
        triton_rnn._parse_variant("spin", "0", "0")
    with pytest.raises(ValueError, match="GRNN_TRITON_RESIDENT='yes': expected 0 or 1"):
        triton_rnn._parse_variant("load", "yes", "0")
    with pytest.raises(ValueError, match="GRNN_TRITON_PERM='on': expected 0 or 1"):
        triton_rnn._parse_variant("load", "0", "on")
    assert triton_rnn._parse_variant("load", "1", "0") == ("load", True, False)
    assert triton_rnn._parse_variant("atomic", "0", "1") == ("atomic", False, True)


def test_a_failed_barrier_is_reported(monkeypatch):
    """The sticky flag that a barrier sets when it gives up turns into an error naming the
    fix at the next check (the first launch is checked)."""
    from grnn_fairseq.kernels import triton_rnn

    device = torch.device(DEVICE)
    monkeypatch.setattr(triton_rnn, "_LAUNCHES", [0])
    monkeypatch.setitem(triton_rnn._HEALTH, device, torch.ones(1, dtype=torch.int32,
                                                                device=device))
    p, mask, upstream = _problem(2, 4, 3, 2, i_size=4, padding=False)
    with pytest.raises(RuntimeError, match="GRNN_TRITON_PROGRAMS"):
        _run("triton", p, mask, upstream, True, False, 3, 2)


@pytest.mark.skipif(not CUDA, reason="several resident programs need a GPU")
@pytest.mark.parametrize("programs", ["3", ""])
@pytest.mark.parametrize("cell", CELLS)
def test_persistent_grid_matches_reference(monkeypatch, cell, programs):
    """Many programs meeting at the time-step barriers: 3 programs walking 24 tiles each
    step, and one program per tile (up to the SM count); forward and backward, padding."""
    from grnn_fairseq.kernels import triton_rnn

    monkeypatch.setattr(triton_rnn, "_FORCED_PROGRAMS", programs)
    k, m, t_len, b = 4, 64, 9, 70
    p, mask, upstream = _problem(k, m, t_len, b, i_size=32, padding=True, seed=2, cell=cell)
    for shuffle, reverse in ((True, False), (True, True), (False, False)):
        ref = _run("reference", p, mask, upstream, shuffle, reverse, t_len, b)
        got = _run("triton", p, mask, upstream, shuffle, reverse, t_len, b)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-3, msg=name)


class _LaunchSpy:
    """Stands in for a kernel: records each launch's grid and keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


# (K, m, T, B): on a GPU one shape with many programs, each with one tile (3 batch tiles x
# 4 groups x 4 unit tiles); in the interpreter, where programs run one after another, the
# two shapes in which the resident forward runs there: one tile over several steps (the
# weights kept across steps), many tiles over one step (no barrier to wait at)
VARIANT_SHAPES = [(4, 64, 9, 70)] if CUDA else [(1, 16, 5, 8), (4, 16, 1, 8)]


@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=lambda s: "K{}-m{}-T{}-B{}".format(*s))
@pytest.mark.parametrize("resident", ["0", "1"])
@pytest.mark.parametrize("poll", ["atomic", "load"])
def test_scan_variants_match_reference(monkeypatch, poll, resident, shape):
    """The persistent scans' A/B variants (VARIANT: barrier polling by loads, the LSTM's
    resident W_hh) against the reference, forward and backward, with padding and the
    shuffle, both directions; the launches must have used the variant asked for."""
    from grnn_fairseq.kernels import triton_rnn

    monkeypatch.setitem(triton_rnn.VARIANT, "poll", poll)
    monkeypatch.setitem(triton_rnn.VARIANT, "resident", resident)
    spy = _LaunchSpy(triton_rnn._scan_fwd)
    monkeypatch.setattr(triton_rnn, "_scan_fwd", spy)
    k, m, t_len, b = shape
    p, mask, upstream = _problem(k, m, t_len, b, i_size=2 * k, padding=t_len > 2, seed=3)
    for reverse in (False, True):
        ref = _run("reference", p, mask, upstream, True, reverse, t_len, b)
        got = _run("triton", p, mask, upstream, True, reverse, t_len, b)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-3, msg=name)
    assert spy.launches and all(kw["POLL"] == poll for _, kw in spy.launches)
    for grid, kw in spy.launches:
        assert kw["RESIDENT"] == (resident == "1")
        if kw["RESIDENT"]:   # one program per tile; one product over all of m
            cdiv = triton_rnn._cdiv
            assert grid == (cdiv(b, kw["BLOCK_B"]) * k * cdiv(m, kw["BLOCK_J"]),)
            assert kw["BLOCK_R"] == m


# (K, m, T, B, resident).  In the interpreter: m a multiple of K (runs of m/K = 4, 2, 3, 1
# units), then m not a multiple of K and K = 1 (both keep SHUFFLE 1); last, the resident
# forward, which the interpreter runs over one step only.  On a GPU (few shapes: each
# compiles its own kernels): many programs, one tile each, runs of 16 units, ordinary and
# resident forward.
PERM_SHAPES = ([(4, 64, 9, 70, "0"), (4, 64, 9, 70, "1")] if CUDA else
               [(4, 16, 5, 6, "0"), (4, 8, 4, 5, "0"), (3, 9, 4, 5, "0"), (4, 4, 4, 3, "0"),
                (4, 6, 4, 3, "0"), (1, 8, 4, 3, "0"), (4, 16, 1, 8, "1")])


@pytest.mark.parametrize("shape", PERM_SHAPES, ids=lambda s: "K{}-m{}-T{}-B{}-res{}".format(*s))
@pytest.mark.parametrize("cell", CELLS)
def test_permuted_columns_match_reference(monkeypatch, cell, shape):
    """VARIANT perm (GRNN_TRITON_PERM=1): with the time-step shuffle, the scans read W_hh
    with its columns reordered and map operand positions to units to match (SHUFFLE 2).
    Forward and backward against the reference, padding, both directions; the launches
    used SHUFFLE 2 exactly where K > 1 divides m, the plain shuffle (1) elsewhere, and
    none (0) without the shuffle, which the variant leaves alone."""
    from grnn_fairseq.kernels import triton_rnn

    k, m, t_len, b, resident = shape
    if resident == "1" and cell != "lstm":
        pytest.skip("the resident forward is the LSTM's (the others ignore the variant)")
    monkeypatch.setitem(triton_rnn.VARIANT, "perm", "1")
    monkeypatch.setitem(triton_rnn.VARIANT, "resident", resident)
    spies = {name: _LaunchSpy(getattr(triton_rnn, name)) for name in ("_scan_fwd", "_scan_bwd")}
    for name, spy in spies.items():
        monkeypatch.setattr(triton_rnn, name, spy)
    p, mask, upstream = _problem(k, m, t_len, b, i_size=2 * k, padding=t_len > 2, seed=5,
                                 cell=cell)
    want = 2 if k > 1 and m % k == 0 else 1
    for shuffle, reverse in ((True, False), (True, True), (False, False)):
        ref = _run("reference", p, mask, upstream, shuffle, reverse, t_len, b)
        got = _run("triton", p, mask, upstream, shuffle, reverse, t_len, b)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-3, msg=name)
        for spy in spies.values():
            assert spy.launches and all(kw["SHUFFLE"] == (want if shuffle else 0)
                                        for _, kw in spy.launches), spy.launches
        # the resident shape must really have run the resident forward
        assert all(kw["RESIDENT"] == (resident == "1")
                   for _, kw in spies["_scan_fwd"].launches), spies["_scan_fwd"].launches
        for spy in spies.values():
            spy.launches.clear()


def test_resident_weights_only_where_they_fit(monkeypatch):
    """The resident forward is the LSTM's, for m a power of two within the byte budget and a
    grid of one program per tile (the interpreter's one-program grid: over one step only);
    anything else runs the ordinary scan.  The grid has fewer programs than tiles where the
    SMs or GRNN_TRITON_PROGRAMS allow fewer."""
    from grnn_fairseq.kernels import triton_rnn

    monkeypatch.setattr(triton_rnn, "_interpreting", lambda: False)
    fits = dict(cell="lstm", m=256, bj=16, itemsize=2, n_tiles=128, n_prog=128, t_len=50)
    assert triton_rnn._resident(**fits)                    # 32 KiB of slices
    for change in (dict(cell="gru"), dict(m=192), dict(itemsize=4), dict(n_prog=100),
                   dict(n_prog=1, t_len=1)):
        assert not triton_rnn._resident(**dict(fits, **change)), change
    monkeypatch.setattr(triton_rnn, "_interpreting", lambda: True)
    assert triton_rnn._resident(**dict(fits, n_prog=1, t_len=1))
    assert not triton_rnn._resident(**dict(fits, n_prog=1, t_len=2))
    monkeypatch.setattr(triton_rnn, "_interpreting", lambda: False)
    monkeypatch.setitem(triton_rnn._SM_COUNT, 0, 100)
    for b, forced, full in ((64, None, True), (64, "32", False), (128, None, False)):
        monkeypatch.setattr(triton_rnn, "_FORCED_PROGRAMS", forced)   # 64, 64, 128 tiles
        _, _, _, _, n_prog, n_tiles = triton_rnn._grid(b, 64, 16, torch.device("cuda", 0))
        assert (n_prog == n_tiles) == full, (b, forced)


@pytest.mark.skipif(not CUDA, reason="compilation caches exist on a GPU only")
def test_no_recompilation_for_new_lengths_or_batch_sizes():
    from grnn_fairseq.kernels import triton_rnn

    kernels = (triton_rnn._scan_fwd, triton_rnn._scan_bwd, triton_rnn._decode_step)

    def compiled():
        return [sum(len(c[0]) for c in f.device_caches.values()) for f in kernels]

    stacks = [RecurrentStack(64, 64, cell=cell, groups=4, backend="triton").cuda()
              for cell in CELLS]

    def run(t_len, b):
        for stack in stacks:
            out = stack(torch.randn(t_len, b, 64, device="cuda", requires_grad=True))[0]
            out.sum().backward()
            x = torch.randn(b, 64, device="cuda")
            with torch.no_grad():
                stack.step(x, [s[0] for s in stack.zero_state(b, x)])

    run(5, 17)
    n = compiled()
    assert all(n)
    for t_len, b in ((7, 17), (11, 19), (3, 20)):  # same batch bucket (BLOCK_B = 32)
        run(t_len, b)
    assert compiled() == n


def test_dispatch(monkeypatch):
    monkeypatch.delenv("GRNN_BACKEND", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.resolve_backend(None, "lstm", cpu, torch.float32) == (
        "cpp" if engine.cpp_available() else "torch")
    assert engine.resolve_backend(None, "lstm", cuda, torch.bfloat16) == "triton"
    assert engine.resolve_backend(None, "lstm", cuda, torch.float64) == "torch"
    assert engine.resolve_backend(None, "gru", cuda, torch.float32) == "triton"
    assert engine.resolve_backend(None, "rnn", cuda, torch.float32) == "triton"
    assert engine.resolve_backend(None, "gru", cpu, torch.float32) == (
        "cpp" if engine.cpp_available() else "reference")
    assert engine.resolve_backend(None, "rnn", cpu, torch.float16) == "reference"
    assert engine.resolve_backend("torch", "rnn", cuda, torch.float32) == "reference"
    assert engine.resolve_backend("reference", "lstm", cuda, torch.float32) == "reference"
    monkeypatch.setenv("GRNN_BACKEND", "reference")
    assert engine.resolve_backend(None, "lstm", cuda, torch.float32) == "reference"
    assert engine.resolve_backend("torch", "lstm", cuda, torch.float32) == "torch"
    monkeypatch.setenv("GRNN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="GRNN_BACKEND"):
        engine.resolve_backend(None, "lstm", cpu)
    monkeypatch.delenv("GRNN_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):  # a ConfigError
        engine.resolve_backend("triton", "lstm", cpu, torch.float32)


def test_kernels_compile_for_h100():
    """Ahead-of-time compilation for sm_90 (no GPU needed), in a fresh process without the
    interpreter: the lowering to PTX and SASS that the interpreter never exercises."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = ("from grnn_fairseq.kernels import triton_attention, triton_rnn; "
            "print('compiled', triton_rnn.compile_check(90), "
            "triton_attention.compile_check(90))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's CUDA toolchain (ptxas) is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 dtypes x (3 cells x (forward, backward, step, training step's backward) + the
    # LSTM's other scan variants: a forward that polls by loads with resident weights, a
    # backward that polls by loads), and the attention's forward and backward in each dtype
    assert "compiled 28 4" in proc.stdout
