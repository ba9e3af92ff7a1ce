"""Inputs and the float64 reference of RNNSearch's attention of one position, a check of a
sequence of positions, and RNNSearch's training with and without the fused kernels, for
the tests of those kernels (C++ on the CPU, Triton)."""
import torch


def attention_inputs(s, n, e, a, v, dtype, device="cpu", seed=0):
    """(q [n*e, a], keys [s, n, a], v [a], values [s, n, v]) with gradients."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
                 for shape in ((n * e, a), (s, n, a), (a,), (s, n, v)))


def attention_reference(q, keys, v, values, mask, e):
    """Bahdanau's attention written out in float64: (context [B, V], alpha [S, B])."""
    s, n, a = keys.shape
    energy = (torch.tanh(q.double().view(1, n, e, a) + keys.double().unsqueeze(2))
              * v.double()).sum(-1)
    if mask is not None:
        energy = energy.masked_fill(mask.unsqueeze(-1), float("-inf"))
    alpha = torch.softmax(energy, 0)
    return (torch.einsum("sne,snv->nev", alpha, values.double()).reshape(n * e, -1),
            alpha.reshape(s, -1))


def left_padding(s, n, lengths, device="cpu"):
    """[s, n] (True = pad) as fairseq's encoders make it: a transposed view."""
    mask = torch.zeros(n, s, dtype=torch.bool, device=device)
    for j, length in enumerate(lengths):
        mask[j, :s - length] = True
    return mask.t()


def check_sequence_of_positions(kernels, dtype, device, tol, monkeypatch):
    """Several target positions over the same keys and values by ``kernels``, the keys'
    and v's gradients added in place (``attention.sequence_keys``) and the values' handed
    over (``sequence_values``), with gradients of all three from elsewhere too, against
    the float64 formula per position; a backward of the queries only leaves nothing behind,
    and two backwards through the retained graph give twice one."""
    from grnn_fairseq import attention

    buffers = []
    real = attention.KeyGrads.buffers
    monkeypatch.setattr(attention.KeyGrads, "buffers",
                        lambda self, *a: buffers.append(a[2]) or real(self, *a))
    s, n, t_len = 20, 3, 4
    _, keys, v, values = attention_inputs(s, n, 1, 9, 7, dtype, device)
    queries = torch.randn(t_len, n, 9, device=device, dtype=dtype, requires_grad=True)
    mask = left_padding(s, n, (20, 3, 17), device)
    inputs = [queries, keys, v, values]

    def loss_of(fused):
        k, h = keys, values
        if fused:
            k, key_grads = attention.sequence_keys(keys, v)
            h, value_grads = attention.AdditiveAttention.sequence_values(values)
        total = 0.1 * (k.pow(2).sum() + h.sum() + v.exp().sum())  # gradients from elsewhere
        for i in range(t_len):
            if fused:
                c, a = attention.fused_attention(kernels, queries[i], k, v, h, mask, 1,
                                                 key_grads, value_grads)
            else:
                c, a = attention_reference(queries[i], keys, v, values, mask, 1)
            total = total + (c.double() * (i + 1)).sin().sum() + a.double().pow(2).sum()
        return total

    want = torch.autograd.grad(loss_of(False), inputs)
    loss = loss_of(True)
    first = torch.autograd.grad(loss, [queries], retain_graph=True)[0]
    torch.testing.assert_close(first.double(), want[0].double(), atol=tol, rtol=tol)
    assert not buffers  # the keys' sums were not touched by a backward of the queries only
    once = torch.autograd.grad(loss, inputs, retain_graph=True)
    # every position added its keys' and v's gradients in place, in the kernels' dtype
    assert buffers == [kernels.sum_dtype(dtype)] * t_len
    for name, got, w in zip("queries keys v values".split(), once, want):
        torch.testing.assert_close(got.double(), w.double(), atol=tol, rtol=tol,
                                   msg=lambda m: f"d {name}: {m}")
    loss.backward(retain_graph=True)
    loss.backward()
    for name, x, g in zip("queries keys v values".split(), inputs, once):
        torch.testing.assert_close(x.grad, 2 * g, atol=tol / 10, rtol=tol / 10,
                                   msg=lambda m: f"d {name}: {m}")


def rnnsearch_training_both_ways(kernels, model_of, monkeypatch, device="cpu"):
    """RNNSearch's training step (a loss on the log-probabilities and on the attention
    weights) with ``kernels.VARIANT['attention']`` '0' (PyTorch's ops), then '1' ->
    (calls, [(loss, {parameter name: gradient})] for each): one call per position that ran
    fused, True where ``kernels`` ran it with both sequence sums.  model_of() builds the
    model, the same weights each time."""
    from test_models import prev_tokens, source_batch

    from grnn_fairseq import attention

    calls = []
    real = attention._FusedAttention.apply
    monkeypatch.setattr(attention._FusedAttention, "apply",
                        lambda *a: calls.append(a[0] is kernels and a[1] is not None
                                                and a[2] is not None) or real(*a))
    _, src, lengths = source_batch()
    prev = prev_tokens(src.shape[0], 5)
    results = []
    for on in ("0", "1"):
        monkeypatch.setitem(kernels.VARIANT, "attention", on)
        model = model_of()
        logits, attn = model(src.to(device), lengths.to(device), prev.to(device))
        loss = torch.log_softmax(logits, -1).sum() + attn["attn"][0].pow(2).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    return calls, results
