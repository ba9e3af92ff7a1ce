"""The models' dropout on the CPU (grnn_fairseq/dropout.py, kernels/dropout_cpu.cpp): the
mask against Philox4x32-10 written here in numpy (itself checked on Random123's
known-answer vectors), its distribution, the gradient, and where it runs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grnn_fairseq import dropout
from grnn_fairseq.dropout import Dropout, seeded_dropout
from grnn_fairseq.errors import ConfigError
from grnn_fairseq.kernels import cpu_rnn

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox4x32_10(counters, key):
    """Philox4x32-10 of the paper (Salmon et al. 2011): counters uint64 [n, 4] (32-bit
    words), key (k0, k1) -> [n, 4] words."""
    c = [counters[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = key
    for _ in range(10):
        p0, p1 = np.uint64(M0) * c[0], np.uint64(M1) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & np.uint64(MASK32),
             (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & np.uint64(MASK32)]
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return np.stack(c, 1)


def test_reference_philox_matches_random123():
    """Random123's known-answer vectors (its tests/kat_vectors) for philox4x32_10."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD))]
    for counter, key, want in cases:
        got = philox4x32_10(np.array([counter], dtype=np.uint64), key)[0]
        assert [int(w) for w in got] == list(want)


def reference_keep(n, p, seed):
    """The keep mask of elements 0..n-1: element e of block b = e // 64 takes word
    (e % 64) // 16 of counter 16 b + e % 16 (words: the counter's low and high 32 bits,
    0, 0) under the key (low, high 32 bits of the seed); kept if below round((1-p) 2^32)."""
    e = np.arange(n, dtype=np.uint64)
    counter = (e // np.uint64(64)) * np.uint64(16) + e % np.uint64(16)
    words = philox4x32_10(np.stack([counter & np.uint64(MASK32), counter >> np.uint64(32),
                                    0 * counter, 0 * counter], 1),
                          (seed & MASK32, (seed >> 32) & MASK32))
    u = words[np.arange(n), ((e % np.uint64(64)) // np.uint64(16)).astype(np.int64)]
    threshold = min(round((1 - p) * 2.0 ** 32), MASK32)
    return torch.from_numpy(u < np.uint64(threshold))


@pytest.mark.parametrize("n,seed", [(1000, 123), (64 * 300 + 17, 2 ** 62 + 987654321),
                                    (5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_is_philox(n, seed, dtype):
    """Every element's mask equals the reference's, kept values are x / (1 - p): a partial
    last block, several parallel tasks (19,217 elements), a seed using its high word."""
    p = 0.3
    x = torch.randn(n, dtype=dtype)
    y = seeded_dropout(x, p, seed)
    keep = reference_keep(n, p, seed)
    scale = torch.tensor(1 / (1 - p), dtype=dtype)
    assert torch.equal(y, torch.where(keep, x * scale, torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_distribution(p):
    """Keep rate within 5 standard deviations of 1 - p; neighbours uncorrelated (lag 1, 16,
    64: within and across the 16-counter blocks); another seed another mask."""
    n = 1 << 18
    keep = seeded_dropout(torch.ones(n), p, 99) != 0
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * sd
    k = keep.double() - keep.double().mean()
    for lag in (1, 16, 64):
        corr = (k[lag:] * k[:-lag]).mean() / k.var()
        assert abs(corr.item()) < 5 / (n ** 0.5), lag
    other = seeded_dropout(torch.ones(n), p, 100) != 0
    assert (keep != other).double().mean().item() == pytest.approx(2 * p * (1 - p), abs=0.01)


def test_same_seed_same_mask_at_any_thread_count():
    x = torch.randn(64, 1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = seeded_dropout(x, 0.2, 5)
        torch.set_num_threads(max(2, threads))
        many = seeded_dropout(x, 0.2, 5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert torch.equal(seeded_dropout(x.t(), 0.2, 5), seeded_dropout(x.t().contiguous(), 0.2, 5))


def test_gradient_is_the_same_mask():
    """dL/dx = dL/dy * m / (1 - p) with the forward's mask; first and second order
    (gradcheck in float64: the map is linear in x for a fixed seed)."""
    x = torch.randn(3, 50, dtype=torch.float64, requires_grad=True)
    y = seeded_dropout(x, 0.4, 11)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    keep = y.detach() != 0
    torch.testing.assert_close(dx, torch.where(keep, g / 0.6, torch.zeros(())), rtol=0, atol=1e-15)
    torch.autograd.gradcheck(lambda t: seeded_dropout(t, 0.4, 11), (x,))
    torch.autograd.gradgradcheck(lambda t: seeded_dropout(t, 0.4, 11), (x,))


def test_nan_survives_where_dropped():
    """x * mask keeps a NaN of x also where the mask drops it, as F.dropout does."""
    x = torch.full((4096,), float("nan"))
    assert torch.isnan(seeded_dropout(x, 0.5, 1)).all()


def test_bad_rate_is_refused():
    for p in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="must be in"):
            seeded_dropout(torch.ones(3), p, 1)


@pytest.fixture
def calls(monkeypatch):
    """Counts the C++ op's calls (forward and backward)."""
    monkeypatch.setitem(dropout.VARIANT, "dropout", "1")
    ops = cpu_rnn.load()
    count = []
    real = ops.seeded_dropout

    class Counting:
        def __getattr__(self, name):
            return getattr(ops, name)

        def seeded_dropout(self, *args):
            count.append(args)
            return real(*args)

    monkeypatch.setattr(cpu_rnn, "load", lambda: Counting())
    return count


def test_module_follows_fairseq_dropout(calls, monkeypatch):
    """Training: the seeded path, repeatable under torch.manual_seed; eval: identity unless
    --retain-dropout (apply_during_inference); p = 0: identity; half precision,
    GRNN_CPU_DROPOUT=0: F.dropout (bernoulli_); a bad switch value is named."""
    module = Dropout(0.25, module_name="RNNSearchDecoder").train()
    x = torch.randn(8, 300)
    torch.manual_seed(3)
    a = module(x)
    torch.manual_seed(3)
    b = module(x)
    c = module(x)
    assert len(calls) == 3 and torch.equal(a, b) and not torch.equal(a, c)
    assert module.eval()(x) is x and len(calls) == 3
    module.apply_during_inference = True
    assert not torch.equal(module(x), x) and len(calls) == 4
    assert Dropout(0.0).train()(x) is x and len(calls) == 4

    torch.manual_seed(3)
    half = module.train()(x.bfloat16())
    assert len(calls) == 4 and half.dtype == torch.bfloat16
    torch.manual_seed(3)
    assert torch.equal(half, F.dropout(x.bfloat16(), 0.25, True))
    monkeypatch.setitem(dropout.VARIANT, "dropout", "0")
    torch.manual_seed(3)
    off = module(x)
    torch.manual_seed(3)
    assert torch.equal(off, F.dropout(x, 0.25, True)) and len(calls) == 4
    monkeypatch.setitem(dropout.VARIANT, "dropout", "yes")
    with pytest.raises(ConfigError, match="GRNN_CPU_DROPOUT='yes': expected 0 or 1"):
        module(x)


@pytest.mark.parametrize("kind", ["rnnsearch", "lm"])
def test_models_train_with_it(calls, kind):
    """The models' dropouts are these modules, and a training step runs the seeded path
    both ways (embeddings, between layers, the readout)."""
    from test_models import build_lm, build_mt, prev_tokens, source_batch

    if kind == "lm":
        model, inputs = build_lm(groups=2, dropout=0.3), (prev_tokens(3, 6),)
    else:
        _, src, lengths = source_batch((7, 2, 4))
        model, inputs = build_mt(groups=2, dropout=0.3), (src, lengths, prev_tokens(3, 6))
    kinds = {type(m) for m in model.modules() if "Dropout" in type(m).__name__}
    assert kinds == {Dropout}
    out, _ = model.train()(*inputs)
    forward_calls = len(calls)
    assert forward_calls >= 3
    out.sum().backward()
    assert len(calls) == 2 * forward_calls
