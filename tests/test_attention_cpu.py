"""RNNSearch's attention as one C++ pass each way on the CPU (kernels/attention_cpu.cpp,
the default where the recurrence runs on the ``cpp`` backend) against the float64 formula,
and against PyTorch's ops (``GRNN_CPU_ATTENTION=0``) through RNNSearch's training."""
import pytest
import torch
from attention_cases import (
    attention_inputs, attention_reference, check_sequence_of_positions, left_padding,
    rnnsearch_training_both_ways)

from grnn_fairseq import attention
from grnn_fairseq.attention import fused, fused_attention
from grnn_fairseq.errors import ConfigError
from grnn_fairseq.kernels import cpu_attention


@pytest.fixture(autouse=True)
def _cpu_attention_on(monkeypatch):
    monkeypatch.delenv("GRNN_BACKEND", raising=False)
    monkeypatch.setitem(cpu_attention.VARIANT, "attention", "1")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("s,n,e,lengths", [
    (7, 3, 1, None),            # no mask
    (37, 3, 1, (37, 2, 18)),    # left padding, a source of 2 tokens
    (5, 2, 3, (5, 1)),          # beam search's rows: 3 per source, keys' gradient too
])
def test_cpu_attention_matches_reference(s, n, e, lengths, dtype, tol):
    """Context, weights (exactly 0 on the pads), and the gradients of the query, the keys,
    v and the values from a loss on the context and on the weights, against the formula in
    float64.  Widths 70 and 67: whole vectors and a remainder."""
    q, keys, v, values = attention_inputs(s, n, e, 70, 67, dtype)
    mask = left_padding(s, n, lengths) if lengths else None
    context, alpha = fused_attention(cpu_attention, q, keys, v, values, mask, e)
    want_c, want_a = attention_reference(q, keys, v, values, mask, e)
    assert context.dtype == alpha.dtype == dtype
    torch.testing.assert_close(context.double(), want_c, atol=tol, rtol=tol)
    torch.testing.assert_close(alpha.double(), want_a, atol=tol, rtol=tol)
    if mask is not None:
        assert (alpha[mask.repeat_interleave(e, 1)] == 0).all()
    g = torch.Generator().manual_seed(1)
    d_c, d_a = (torch.randn(want_c.shape, generator=g, dtype=torch.float64),
                torch.randn(want_a.shape, generator=g, dtype=torch.float64))
    inputs = (q, keys, v, values)

    def grads(c, a):
        return torch.autograd.grad((c.double() * d_c).sum() + (a.double() * d_a).sum(), inputs)

    for name, got, want in zip(("q", "keys", "v", "values"), grads(context, alpha),
                               grads(want_c, want_a)):
        torch.testing.assert_close(got.double(), want.double(), atol=10 * tol, rtol=10 * tol,
                                   msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 60.0), (torch.float64, 400.0)])
def test_cpu_attention_with_saturated_units(dtype, scale):
    """Pre-activations q + k far into tanh's flat tails (|q + k| up to about 3 x scale, past
    where 4 exp(-2x) overflows the dtype): finite gradients, equal to the float64
    formula's.  Training reaches such keys: a quickstart run stopped with NaN gradients in
    its fifth epoch when the slope was formed as (4 e r) r."""
    q, keys, v, values = (t.detach() for t in attention_inputs(9, 4, 1, 33, 6, dtype))
    q, keys = q * scale, keys * scale
    for t in (q, keys, v, values):
        t.requires_grad_()
    mask = left_padding(9, 4, (9, 2, 5, 7))
    context, alpha = fused_attention(cpu_attention, q, keys, v, values, mask, 1)
    want_c, want_a = attention_reference(q, keys, v, values, mask, 1)
    d_c = torch.randn(want_c.shape, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    got = torch.autograd.grad((context.double() * d_c).sum(), (q, keys, v, values))
    want = torch.autograd.grad((want_c * d_c).sum(), (q, keys, v, values))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(context.double(), want_c, atol=tol, rtol=tol)
    for name, g, w in zip(("q", "keys", "v", "values"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w.double(), atol=tol, rtol=tol,
                                   msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cpu_attention_sums_a_sequence_of_positions(monkeypatch, dtype, tol):
    """A sequence's keys' and v's gradients added in place, the values' handed over
    (attention_cases.check_sequence_of_positions), in the keys' dtype."""
    check_sequence_of_positions(cpu_attention, dtype, "cpu", tol, monkeypatch)


@pytest.mark.parametrize("cell,groups,rate", [("lstm", 2, 0.0), ("gru", 1, 0.5)])
def test_rnnsearch_trains_with_the_cpu_attention(monkeypatch, cell, groups, rate):
    """RNNSearch's training step in float64 with the C++ attention at every target position
    (both sequence sums in use) gives the loss and gradients of PyTorch's ops."""
    from test_models import build_mt, max_diff

    calls, results = rnnsearch_training_both_ways(
        cpu_attention, lambda: build_mt(cell=cell, groups=groups, rate=rate).double(),
        monkeypatch)
    assert calls == [True] * 5  # every target position, with the fused kernels
    (loss_ops, ops), (loss_fused, got) = results
    assert max_diff(loss_ops, loss_fused) < 1e-10
    assert ops.keys() == got.keys()
    for name in ops:
        assert max_diff(ops[name], got[name]) < 1e-10, name


def test_where_the_cpu_attention_runs(monkeypatch):
    """On the CPU in float32 and float64 where the recurrence runs on ``cpp``; not in half
    precision, under autocast, on another backend, or with GRNN_CPU_ATTENTION=0; a bad
    value of the switch is refused by name."""
    keys = torch.zeros(2, 2, 4)
    assert fused(keys) is cpu_attention and fused(keys.double()) is cpu_attention
    assert fused(keys.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(keys) is None
    for backend in ("reference", "torch"):
        monkeypatch.setenv("GRNN_BACKEND", backend)
        assert fused(keys) is None
    monkeypatch.delenv("GRNN_BACKEND")
    monkeypatch.setitem(cpu_attention.VARIANT, "attention", "0")
    assert fused(keys) is None
    monkeypatch.setitem(cpu_attention.VARIANT, "attention", "yes")
    with pytest.raises(ConfigError, match="GRNN_CPU_ATTENTION='yes': expected 0 or 1"):
        fused(keys)


def test_cpu_attention_refuses_mixed_dtypes():
    """The C++ op names what it needs instead of reading the wrong memory."""
    q, keys, v, values = (t.detach() for t in attention_inputs(3, 2, 1, 4, 5, torch.float32))
    with pytest.raises(RuntimeError, match="must all be float32 or all float64"):
        cpu_attention.forward(q, keys, v, values.double(), None, 1)
