"""The input projection through oneDNN (:mod:`grnn_fairseq.kernels.onednn`): its products
and gradients against a float64 ``baddbmm`` reference, when ``project_input`` takes it
and when not, a whole layer with it against the same layer on PyTorch's products, and
the switch GRNN_CPU_GEMM refused by name."""
import pytest
import torch

from grnn_fairseq import engine
from grnn_fairseq.errors import ConfigError
from grnn_fairseq.kernels import onednn
from grnn_fairseq.recurrent import RecurrentStack

needs_onednn = pytest.mark.skipif(bool(onednn.unavailable()),
                                  reason=f"oneDNN cannot run here: {onednn.unavailable()}")


@pytest.fixture(autouse=True)
def not_intel(monkeypatch):
    """Every test here runs as on a CPU where ``auto`` picks oneDNN (an AMD one with
    AVX-512): on Intel CPUs and without AVX-512 it picks MKL
    (test_auto_picks_onednn_only_on_other_vendors_with_avx512)."""
    monkeypatch.setattr(onednn, "_vendor", "AuthenticAMD")
    monkeypatch.setattr(onednn, "_avx512", True)


def _reference(x, weight, bias):
    """The grouped projection in float64, by PyTorch's batched product."""
    k, _, i = weight.shape
    xk = x.double().view(x.shape[0], k, i).transpose(0, 1)
    return torch.baddbmm(bias.double().unsqueeze(1), xk, weight.double().transpose(1, 2))


def _problem(n, k, i, o, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k * i, generator=g).requires_grad_()
    weight = (torch.randn(k, o, i, generator=g) / i ** 0.5).requires_grad_()
    bias = torch.randn(k, o, generator=g).requires_grad_()
    return x, weight, bias


@needs_onednn
@pytest.mark.parametrize("n,k,i,o", [(37, 1, 24, 96), (37, 4, 24, 96), (200, 16, 8, 32),
                                     (5, 2, 250, 1000)])
def test_grouped_linear_matches_reference(n, k, i, o):
    """Outputs and the three gradients of :class:`GroupedLinear` against float64, and one
    oneDNN call per group in the forward and per group for the input gradient."""
    x, weight, bias = _problem(n, k, i, o)
    before = onednn.calls
    y = onednn.grouped_linear(x, weight, bias)
    assert onednn.calls - before == k
    want = _reference(x, weight, bias)
    assert y.shape == (k, n, o) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    d = torch.randn(k, n, o, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, (x, weight, bias), d)
    assert onednn.calls - before == 3 * k  # and the input and weight gradients
    ref = [p.detach().double().requires_grad_() for p in (x, weight, bias)]
    wants = torch.autograd.grad(_reference(*ref), ref, d.double())
    for a, b, name in zip(got, wants, ("x", "weight", "bias")):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4, msg=name)


@needs_onednn
def test_project_input_takes_onednn_where_it_pays(monkeypatch):
    """fp32 CPU products of at least MIN_MACS per group go through oneDNN, with the
    result of PyTorch's products; smaller ones, fp64, autocast and GRNN_CPU_GEMM=blas
    keep PyTorch's."""
    x, weight, bias = _problem(64, 4, 32, 128)
    monkeypatch.delenv("GRNN_CPU_GEMM", raising=False)
    monkeypatch.setattr(onednn, "MIN_MACS", 64 * 32 * 128)  # exactly this product
    monkeypatch.setattr(onednn, "FIRST_MACS", 1)  # no first call of a shape kept on MKL

    def calls(x_, w_, b_, gemm=None):
        if gemm:
            monkeypatch.setenv("GRNN_CPU_GEMM", gemm)
        before = onednn.calls
        y = engine.project_input(x_, w_, b_)
        monkeypatch.delenv("GRNN_CPU_GEMM", raising=False)
        return y, onednn.calls - before

    y, n = calls(x, weight, bias)
    assert n == 4
    y_blas, n_blas = calls(x, weight, bias, "blas")
    assert n_blas == 0
    torch.testing.assert_close(y, y_blas, rtol=1e-5, atol=1e-5)
    assert calls(x, weight, bias, "onednn")[1] == 4
    assert calls(x[:63], weight, bias)[1] == 0  # one row short of MIN_MACS
    assert calls(*(t.double() for t in (x, weight, bias)))[1] == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp, n_amp = calls(x, weight, bias)
    assert n_amp == 0 and y_amp.dtype == torch.bfloat16


@needs_onednn
@pytest.mark.parametrize("route", ["weight_grad_op", "transposed"])
@pytest.mark.parametrize("bias", [False, True], ids=["dW", "dW+db"])
@pytest.mark.parametrize("k,n,i,o", [(1, 37, 24, 96), (3, 50, 8, 24), (4, 300, 32, 128)])
def test_weight_grad_matches_reference(monkeypatch, k, n, i, o, bias, route):
    """dW[k] = d[k]^T x_k (and db[k], d[k]'s column sums) by oneDNN, one call per group,
    against float64, on both routes: oneDNN's weight gradient op (any size with the bias;
    from WEIGHT_GRAD_MACS without it) and x_k^T d[k] through the forward op."""
    monkeypatch.setattr(onednn, "WEIGHT_GRAD_MACS", 1 if route == "weight_grad_op" else 1 << 60)
    g = torch.Generator().manual_seed(3)
    d, x = torch.randn(k, n, o, generator=g), torch.randn(n, k * i, generator=g)
    ops = {"weight": 0, "forward": 0}
    for name, attr in (("weight", "_linear_weight_grad"), ("forward", "_linear")):
        def counted(*args, _f=getattr(onednn, attr), _name=name):
            ops[_name] += 1
            return _f(*args)
        monkeypatch.setattr(onednn, attr, counted)
    before = onednn.calls
    got = onednn.weight_grad(d, x, bias)
    dw, db = got if bias else (got, None)
    assert onednn.calls - before == k and dw.shape == (k, o, i)
    by_op = route == "weight_grad_op" or bias
    assert ops == {"weight": k if by_op else 0, "forward": 0 if by_op else k}
    want = torch.bmm(d.double().transpose(1, 2), x.double().view(n, k, i).transpose(0, 1))
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(db.double(), d.double().sum(1), rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True], ids=["dW", "dW+db"])
@pytest.mark.parametrize("k,n,i,o", [(1, 37, 24, 96), (3, 50, 8, 24), (4, 300, 32, 128)])
def test_weight_grad_t_matches_reference(k, n, i, o, bias):
    """dW[k] = d_t[k] x_k from the transposed gate gradients d_t [K, O, N] (as the C++
    backward writes them), one forward op per group, and db[k], d_t[k]'s row sums, against
    float64."""
    g = torch.Generator().manual_seed(4)
    d_t, x = torch.randn(k, o, n, generator=g), torch.randn(n, k * i, generator=g)
    before = onednn.calls
    got = onednn.weight_grad_t(d_t, x, bias)
    dw, db = got if bias else (got, None)
    assert onednn.calls - before == k and dw.shape == (k, o, i)
    want = torch.bmm(d_t.double(), x.double().view(n, k, i).transpose(0, 1))
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(db.double(), d_t.double().sum(2), rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("groups,bidirectional", [(1, False), (4, True)])
def test_layer_with_onednn_matches_blas(monkeypatch, groups, bidirectional, cell):
    """A two-layer stack (cpp backend) trained one step: output, final states and every
    weight gradient with the projection, its gradients and the scan's dW_hh by oneDNN (the
    C++ backward then returns the hidden-side gate gradients: the GRU's differ from the
    input side's) equal those with PyTorch's products."""
    monkeypatch.setattr(onednn, "MIN_MACS", 1)
    monkeypatch.setattr(onednn, "FIRST_MACS", 1)
    torch.manual_seed(0)
    stack = RecurrentStack(48, 64, num_layers=2, cell=cell, groups=groups,
                           bidirectional=bidirectional, backend="cpp")
    x = torch.randn(9, 17, 48)  # 17 rows: a tile of the C++ backward's transpose, and one
    mask = torch.ones(9, 17, dtype=torch.bool)
    mask[7:, 1] = False
    runs = {}
    # the autograd nodes of the recurrences, and the C++ loop given the groups' projections
    # apart (in CppProjectedScan, and without autograd)
    nodes = {"CppProjectedScan": 0, "CppScan": 0, "apart": 0}
    for name in nodes:
        owner, attr = (engine, "_cpp_projected_forward") if name == "apart" else (
            getattr(engine, name), "apply")
        def counted(*args, _f=getattr(owner, attr), _name=name):
            nodes[_name] += 1
            return _f(*args)
        monkeypatch.setattr(owner, attr, counted)
    directions = 2 if bidirectional else 1
    for gemm in ("blas", "onednn"):
        monkeypatch.setenv("GRNN_CPU_GEMM", gemm)
        stack.zero_grad()
        before, seen = onednn.calls, dict(nodes)
        out, finals = stack(x, padding_mask=~mask)
        (out.square().sum() + sum(s.sum() for s in finals)).backward()
        runs[gemm] = [out, *finals] + [p.grad.clone() for p in stack.parameters()]
        # per direction and group: forward, dW_ih and dW_hh in both layers, dx in the second
        # (x needs no gradient)
        assert onednn.calls - before == (7 * groups * directions if gemm == "onednn" else 0)
        # oneDNN's projections go to the C++ loop one tensor per group, in one node
        with torch.no_grad():  # and without autograd
            runs[gemm].append(stack(x, padding_mask=~mask)[0])
        layers = 2 * directions
        assert {n: nodes[n] - seen[n] for n in nodes} == (
            {"CppProjectedScan": layers, "CppScan": 0, "apart": 2 * layers}
            if gemm == "onednn" else {"CppProjectedScan": 0, "CppScan": layers, "apart": 0})
    for a, b in zip(runs["onednn"], runs["blas"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_frozen_weights_with_onednn_match_blas(monkeypatch, cell):
    """With W_ih frozen (fine-tuning), the biases' and W_hh's gradients through
    CppProjectedScan equal those with PyTorch's products: the GRU's input bias gradient is
    then its own sum (its candidate's recurrent term is gated), the others' the recurrent
    bias's."""
    monkeypatch.setattr(onednn, "MIN_MACS", 1)
    monkeypatch.setattr(onednn, "FIRST_MACS", 1)
    torch.manual_seed(1)
    stack = RecurrentStack(16, 32, num_layers=1, cell=cell, groups=4, backend="cpp")
    for name, p in stack.named_parameters():
        p.requires_grad_("weight_ih" not in name)
    x = torch.randn(6, 3, 16, requires_grad=True)
    runs = {}
    for gemm in ("blas", "onednn"):
        monkeypatch.setenv("GRNN_CPU_GEMM", gemm)
        stack.zero_grad()
        x.grad = None
        out, _ = stack(x)
        out.square().sum().backward()
        runs[gemm] = [x.grad.clone()] + [p.grad.clone() for p in stack.parameters()
                                         if p.requires_grad]
    assert len(runs["onednn"]) == 4  # dx, dW_hh, db_ih, db_hh
    for a, b in zip(runs["onednn"], runs["blas"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("by_onednn", ["projection", "recurrence"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_one_product_by_onednn_beside_blas(monkeypatch, cell, by_onednn):
    """Where oneDNN takes only the projection (the scan's dW_hh then comes from the
    transposed gate gradients by PyTorch's product) or only dW_hh (CppScan: the projection
    by PyTorch's products, dW_hh from the transposed gate gradients by oneDNN) -- their
    shapes differ, and each product counts on its own towards REUSE -- every gradient equals
    that of PyTorch's products."""
    monkeypatch.setattr(onednn, "MIN_MACS", 1)
    monkeypatch.setattr(onednn, "FIRST_MACS", 1)
    torch.manual_seed(2)
    stack = RecurrentStack(48, 64, num_layers=1, cell=cell, groups=4, backend="cpp")
    x = torch.randn(7, 19, 48, requires_grad=True)
    real, asked = onednn.wanted, []
    width = 12 if by_onednn == "projection" else 16  # W_ih [4, Gm, 12], W_hh [4, Gm, 16]

    def only_one(x, weight):
        asked.append(weight.shape[2])
        return weight.shape[2] == width and real(x, weight)
    monkeypatch.setattr(onednn, "wanted", only_one)
    runs = {}
    for gemm in ("blas", "onednn"):
        monkeypatch.setenv("GRNN_CPU_GEMM", gemm)
        stack.zero_grad()
        x.grad = None
        asked.clear()
        before = onednn.calls
        out, _ = stack(x)
        out.square().sum().backward()
        runs[gemm] = [x.grad.clone()] + [p.grad.clone() for p in stack.parameters()]
        # oneDNN: the projection, dx and dW_ih per group, or dW_hh per group
        assert asked == [12, 16]
        assert onednn.calls - before == (0 if gemm == "blas" else
                                         3 * 4 if by_onednn == "projection" else 4)
    for a, b in zip(runs["onednn"], runs["blas"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_first_product_of_a_shape_keeps_blas(monkeypatch):
    """oneDNN compiles a kernel per shape: the first REUSE products of a shape (fairseq's
    next batch, N rows it has not seen) stay on MKL unless all groups' multiply-adds reach
    FIRST_MACS; later ones go to oneDNN; the oldest shapes are forgotten."""
    monkeypatch.delenv("GRNN_CPU_GEMM", raising=False)
    monkeypatch.setattr(onednn, "MIN_MACS", 1)
    monkeypatch.setattr(onednn, "_seen", {})
    monkeypatch.setattr(onednn, "SEEN_MAX", 2)
    monkeypatch.setattr(onednn, "REUSE", 2)
    weight = torch.zeros(4, 16, 8)

    def takes(n):
        return onednn.wanted(torch.zeros(n, 32), weight)

    monkeypatch.setattr(onednn, "FIRST_MACS", 4 * 16 * 8 * 10)  # 10 rows and more: at once
    assert takes(10) and takes(11)
    assert [takes(9) for _ in range(4)] == [False, False, True, True]
    assert not takes(5) and not takes(6)  # two new shapes: 9 rows is forgotten
    assert not takes(9) and not takes(6) and takes(6) and not takes(9) and takes(9)


@needs_onednn
def test_layer_asks_onednn_once_per_projection(monkeypatch):
    """A layer's projection counts once towards REUSE: the first REUSE forwards of a shape
    run the projection by PyTorch's products and the stacked scan (CppScan), the next ones
    oneDNN with the groups' projections apart (CppProjectedScan)."""
    monkeypatch.setattr(onednn, "MIN_MACS", 1)
    monkeypatch.setattr(onednn, "FIRST_MACS", 1 << 60)
    monkeypatch.setattr(onednn, "_seen", {})
    stack = RecurrentStack(16, 32, num_layers=1, groups=4, backend="cpp")
    x = torch.randn(5, 3, 16, requires_grad=True)
    nodes = []
    for name in ("CppScan", "CppProjectedScan"):
        def counted(*args, _f=getattr(engine, name).apply, _name=name):
            nodes.append(_name)
            return _f(*args)
        monkeypatch.setattr(getattr(engine, name), "apply", counted)
    before = onednn.calls
    for _ in range(onednn.REUSE + 1):
        stack(x)[0].sum().backward()
    assert nodes == ["CppScan"] * onednn.REUSE + ["CppProjectedScan"]
    # the last pass, per group: the projection, dx, dW_ih and dW_hh (whose product by
    # oneDNN has its own shape, also seen REUSE times before)
    assert onednn.calls - before == 4 * 4


def test_gemm_switch_refused_by_name(monkeypatch):
    """GRNN_CPU_GEMM must be auto, onednn or blas; onednn where oneDNN cannot run says
    why.  auto then falls back to PyTorch's products with the same result."""
    x, weight, bias = _problem(8, 2, 4, 16)
    monkeypatch.setattr(onednn, "MIN_MACS", 1)
    monkeypatch.setattr(onednn, "FIRST_MACS", 1)
    monkeypatch.setenv("GRNN_CPU_GEMM", "mkl")
    with pytest.raises(ConfigError, match="GRNN_CPU_GEMM='mkl' is not one of auto, onednn, blas"):
        engine.project_input(x, weight, bias)
    monkeypatch.setattr(onednn, "_probe", "this PyTorch is built without oneDNN (test)")
    monkeypatch.setenv("GRNN_CPU_GEMM", "onednn")
    with pytest.raises(ConfigError, match=r"GRNN_CPU_GEMM=onednn: this PyTorch is built "
                                          r"without oneDNN \(test\); unset it"):
        engine.project_input(x, weight, bias)
    monkeypatch.setenv("GRNN_CPU_GEMM", "auto")
    before = onednn.calls
    y = engine.project_input(x, weight, bias)
    assert onednn.calls == before and onednn.library() == "blas"
    torch.testing.assert_close(y.double(), _reference(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_probe_rejects_wrong_results(monkeypatch):
    """The first-use check compares oneDNN's product with PyTorch's: an op that computes
    something else is not used."""
    monkeypatch.setattr(onednn, "_probe", None)
    if not torch.backends.mkldnn.is_available():
        assert "without oneDNN" in onednn.unavailable()
        return
    monkeypatch.setattr(onednn, "_linear", lambda x, w, b=None: torch.zeros(x.shape[0], w.shape[0]))
    assert onednn.unavailable() == "mkldnn::_linear_pointwise gave wrong results here"
    monkeypatch.setattr(onednn, "_probe", None)  # wrong only with a transposed weight view

    def wrong_transposed(x, w, b=None):
        return x @ w.t() + (0 if b is None else b) + (0 if w.is_contiguous() else 1)
    monkeypatch.setattr(onednn, "_linear", wrong_transposed)
    assert onednn.unavailable() == ("mkldnn::_linear_pointwise (transposed weight) gave "
                                    "wrong results here")
    monkeypatch.setattr(onednn, "_probe", None)
    monkeypatch.setattr(onednn, "_linear",
                        lambda x, w, b=None: x @ w.t() + (0 if b is None else b))
    assert onednn.unavailable() == ""
    monkeypatch.setattr(onednn, "_probe", None)  # the weight gradient op is checked too
    monkeypatch.setattr(onednn, "_linear_weight_grad",
                        lambda d, x, bias: (d.t() @ x, d.sum(0) + 1))
    assert onednn.unavailable() == "aten::mkldnn_linear_backward_weights gave wrong results here"
    monkeypatch.setattr(onednn, "_probe", None)
    monkeypatch.setattr(onednn, "_linear_weight_grad", lambda d, x, bias: (d.t() @ x, d.sum(0)))
    assert onednn.unavailable() == ""

    def missing(d, x, bias):  # a PyTorch without the op
        return torch.ops.aten.no_such_op_of_this_test(d)
    monkeypatch.setattr(onednn, "_probe", None)
    monkeypatch.setattr(onednn, "_linear_weight_grad", missing)
    assert onednn.unavailable().startswith("aten::mkldnn_linear_backward_weights failed here")


@needs_onednn
@pytest.mark.parametrize("groups", [1, 4])
def test_decoder_training_steps_with_onednn_match_blas(monkeypatch, groups):
    """A decoder trained step by step (``step_weights()``, one ``CppTrainStep`` per layer
    step): its projection and input gradient through oneDNN give the outputs and every
    gradient of PyTorch's products."""
    monkeypatch.setattr(onednn, "MIN_MACS", 1)
    monkeypatch.setattr(onednn, "FIRST_MACS", 1)
    torch.manual_seed(2)
    stack = RecurrentStack(16, 32, num_layers=2, groups=groups, rearrangement="both",
                           backend="cpp")
    xs = torch.randn(4, 3, 16)
    up = torch.randn(4, 3, 32)
    runs = {}
    for gemm in ("blas", "onednn"):
        monkeypatch.setenv("GRNN_CPU_GEMM", gemm)
        x = xs.clone().requires_grad_()
        weights, loss = stack.step_weights(), 0
        states = [s[0] for s in stack.zero_state(3, x)]  # per layer, its one direction
        assert weights[0].engine == "cpp"
        before = onednn.calls
        for t in range(len(x)):
            top, states = stack.step(x[t], states, weights)
            loss = loss + (top * up[t]).sum()
        grads = torch.autograd.grad(loss, [x] + list(stack.parameters()))
        # forward and input gradient of 2 layers x 4 steps, one call per group each
        assert onednn.calls - before == (2 * 2 * 4 * groups if gemm == "onednn" else 0)
        runs[gemm] = [loss.detach(), *grads]
    for a, b in zip(runs["onednn"], runs["blas"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme {flags}
bugs\t\t: spectre_v1

processor\t: 1
vendor_id\t: {vendor}
flags\t\t: fpu vme avx2 avx512f
"""


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD", None])
@pytest.mark.parametrize("flags", ["avx2 fma avx512f avx512bw", "avx2 fma avx512_vnni", None])
def test_cpu_vendor_and_avx512_read_from_cpuinfo(vendor, flags, tmp_path, monkeypatch):
    """The vendor id and the avx512f flag of /proc/cpuinfo's first processor; "" and False
    without them (ARM's has neither) or without the file."""
    info = tmp_path / "cpuinfo"
    text = CPUINFO.format(vendor=vendor, flags=flags)
    if vendor is None:
        text = "\n".join(line for line in text.splitlines() if "vendor_id" not in line)
    if flags is None:  # the first processor's flags line missing
        text = text.replace(f"flags\t\t: fpu vme {flags}\n", "")
    info.write_text(text)
    for read in (onednn.cpu_vendor, onednn.cpu_has_avx512):  # either reads both
        monkeypatch.setattr(onednn, "CPUINFO", str(info))
        monkeypatch.setattr(onednn, "_vendor", None)
        monkeypatch.setattr(onednn, "_avx512", None)
        read()
        monkeypatch.setattr(onednn, "CPUINFO", str(tmp_path / "missing"))
        assert onednn.cpu_vendor() == (vendor or "")
        assert onednn.cpu_has_avx512() is (flags is not None and "avx512f" in flags.split())
    monkeypatch.setattr(onednn, "_vendor", None)
    monkeypatch.setattr(onednn, "_avx512", None)
    assert (onednn.cpu_vendor(), onednn.cpu_has_avx512()) == ("", False)


@needs_onednn
def test_auto_picks_onednn_only_on_other_vendors_with_avx512(monkeypatch):
    """``auto`` takes oneDNN only on x86 CPUs of other vendors than Intel that have
    AVX-512; on an Intel CPU, without AVX-512 and on an unknown CPU it leaves every product
    to PyTorch's (MKL's) and says so, and a whole layer's training step calls oneDNN
    nowhere.  GRNN_CPU_GEMM=onednn still takes oneDNN everywhere."""
    monkeypatch.setattr(onednn, "MIN_MACS", 1)
    monkeypatch.setattr(onednn, "FIRST_MACS", 1)
    x, weight, bias = _problem(64, 4, 32, 128)

    def calls(vendor, avx512, gemm):
        monkeypatch.setattr(onednn, "_vendor", vendor)
        monkeypatch.setattr(onednn, "_avx512", avx512)
        if gemm is None:
            monkeypatch.delenv("GRNN_CPU_GEMM", raising=False)
        else:
            monkeypatch.setenv("GRNN_CPU_GEMM", gemm)
        before = onednn.calls
        stack = RecurrentStack(32, 32, num_layers=1, groups=4, backend="cpp")
        stack(torch.randn(5, 3, 32, requires_grad=True))[0].sum().backward()
        y = engine.project_input(x, weight, bias)
        torch.testing.assert_close(y.double(), _reference(x, weight, bias), rtol=1e-5,
                                   atol=1e-5)
        return onednn.library(), onednn.calls - before

    for vendor, avx512 in [("GenuineIntel", True), ("GenuineIntel", False),
                           ("AuthenticAMD", False), ("HygonGenuine", False), ("", False),
                           ("", True)]:
        assert calls(vendor, avx512, None) == ("blas", 0), (vendor, avx512)
        assert calls(vendor, avx512, "auto") == ("blas", 0), (vendor, avx512)
        library, n = calls(vendor, avx512, "onednn")
        assert library == "onednn" and n > 0, (vendor, avx512)
    for vendor in ("AuthenticAMD", "HygonGenuine", "CentaurHauls"):
        library, n = calls(vendor, True, None)
        assert library == "onednn" and n > 0, vendor
