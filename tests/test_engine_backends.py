"""The ``torch`` engine backend (LSTM with a hand-written backward through time) against
the reference loop, in float64: outputs, final states and every gradient."""
import pytest
import torch

from grnn_fairseq import engine
from grnn_fairseq.recurrent import RecurrentStack


def _problem(k, m, t_len, b, padding, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    i_size = 2 * k
    p = dict(x=rand(t_len * b, i_size),
             w_ih=rand(k, 4 * m, 2, scale=0.5), b_ih=rand(k, 4 * m, scale=0.5),
             w_hh=rand(k, 4 * m, m, scale=0.5), b_hh=rand(k, 4 * m, scale=0.5),
             h0=rand(k, b, m), c0=rand(k, b, m))
    mask = None
    if padding:
        mask = torch.ones(t_len, b, dtype=torch.bool)
        mask[t_len - 2:, 0] = False
        mask[:2, b - 1] = False
    return p, mask


def _scan(backend, p, mask, shuffle, reverse, t_len, b):
    k = p["w_hh"].shape[0]
    gx = engine.project_input(p["x"], p["w_ih"], p["b_ih"]).view(k, t_len, b, -1).transpose(0, 1)
    return engine.scan(gx, (p["h0"], p["c0"]), p["w_hh"], p["b_hh"], "lstm", time_shuffle=shuffle,
                       mask=mask, reverse=reverse, backend=backend)


def _grads(loss, p):
    return torch.autograd.grad(loss, list(p.values()), allow_unused=True)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["noshuffle", "shuffle"])
@pytest.mark.parametrize("k,m", [(1, 5), (4, 8), (3, 8), (4, 6)])  # m % K != 0 included
def test_torch_backend_matches_reference(k, m, shuffle, padding, reverse):
    t_len, b = 6, 3
    p, mask = _problem(k, m, t_len, b, padding)
    g = torch.Generator().manual_seed(1)
    up = [torch.randn(t_len, k, b, m, generator=g, dtype=torch.float64),
          torch.randn(k, b, m, generator=g, dtype=torch.float64),
          torch.randn(k, b, m, generator=g, dtype=torch.float64)]
    results = []
    for backend in ("reference", "torch"):
        out, (h, c) = _scan(backend, p, mask, shuffle, reverse, t_len, b)
        loss = (out * up[0]).sum() + (h * up[1]).sum() + (c * up[2]).sum()
        results.append((out, h, c) + _grads(loss, p))
    for a, b_ in zip(*results):
        torch.testing.assert_close(b_, a, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("use", ["out", "h", "c", "sums"])
def test_partial_and_expanded_upstream_gradients(use):
    """Only some outputs used (missing gradients), or expanded ones (from .sum())."""
    t_len, b = 5, 2
    p, mask = _problem(4, 8, t_len, b, padding=True)
    results = []
    for backend in ("reference", "torch"):
        out, (h, c) = _scan(backend, p, mask, True, False, t_len, b)
        loss = {"out": out.square().sum(), "h": h.square().sum(), "c": c.square().sum(),
                "sums": out.sum() + h.sum() + c.sum()}[use]
        results.append(_grads(loss, p))
    for a, b_ in zip(*results):
        if a is None:
            assert b_ is None or not b_.abs().any()
        else:
            torch.testing.assert_close(b_, a, atol=1e-10, rtol=1e-10)


def test_inference_matches_reference():
    t_len, b = 5, 3
    p, mask = _problem(4, 8, t_len, b, padding=True)
    with torch.no_grad():
        ref = _scan("reference", p, mask, True, True, t_len, b)
        got = _scan("torch", p, mask, True, True, t_len, b)
    torch.testing.assert_close(got[0], ref[0], atol=1e-12, rtol=1e-12)
    for a, b_ in zip(ref[1], got[1]):
        torch.testing.assert_close(b_, a, atol=1e-12, rtol=1e-12)


def test_in_place_change_of_output_fails_backward():
    """The output may share memory with what the backward reads: changing it in place must
    raise, not corrupt the gradients."""
    t_len, b = 4, 2
    p, _ = _problem(2, 4, t_len, b, padding=False)
    out, _ = _scan("torch", p, None, False, False, t_len, b)
    with pytest.raises(RuntimeError, match="inplace"):
        out.mul_(2)           # refused here (a view of a multi-output node) ...
        out.sum().backward()  # ... or at the latest here (saved buffer changed)


def test_decode_step_without_autograd_matches_reference():
    torch.manual_seed(0)
    stack = RecurrentStack(8, 8, num_layers=2, groups=4).double()
    x = torch.randn(3, 8, dtype=torch.double)
    states = [s[0] for s in stack.zero_state(3, x)]
    states = [tuple(torch.randn_like(t) for t in s) for s in states]
    h_grad, s_grad = stack.step(x, states)           # parameters require grad: reference path
    with torch.no_grad():
        h_fast, s_fast = stack.step(x, states)       # no autograd: in-place fast path
    torch.testing.assert_close(h_fast, h_grad, atol=1e-12, rtol=1e-12)
    for a, b in zip(s_grad, s_fast):
        for x1, x2 in zip(a, b):
            torch.testing.assert_close(x2, x1, atol=1e-12, rtol=1e-12)


def test_stack_backend_argument_is_validated():
    with pytest.raises(ValueError, match="backend='cudnn' is not a recurrence backend"):
        RecurrentStack(4, 4, backend="cudnn")


# --------------------------------------------------------------------------- autocast (--amp)
@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_autocast_runs_the_recurrence_in_autocast_dtype(backend):
    """Under autocast (what fairseq's --amp turns on) the input projections come out in
    bf16 while the weights stay fp32: the engine casts every operand to autocast's dtype
    (as torch.nn.LSTM does) instead of failing on mixed dtypes.  Checked against fp32."""
    torch.manual_seed(0)
    stack = RecurrentStack(32, 32, num_layers=2, groups=4, rearrangement="both",
                           bidirectional=True, backend=backend)
    x = torch.randn(6, 3, 32, requires_grad=True)
    ref, ref_states = stack(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, states = stack(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.03, rtol=0.05)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in stack.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # single decoding steps (a unidirectional stack) under autocast too
    uni = RecurrentStack(32, 32, num_layers=2, groups=4, rearrangement="both", backend=backend)
    states = [d[0] for d in uni.zero_state(3, x)]
    with torch.no_grad():
        ref_h, _ = uni.step(x[0], states, uni.step_weights())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, _ = uni.step(x[0], states, uni.step_weights())
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), ref_h, atol=0.03, rtol=0.05)
