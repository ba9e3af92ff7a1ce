"""The recurrent layers' large fp32 products on the CPU through oneDNN: the input
projection, its gradients, and the C++ scan's dW_hh.

PyTorch's fp32 matrix products on the CPU (``mm``, ``bmm``, ``baddbmm``) call MKL's
sgemm.  On AMD CPUs MKL runs its AVX2 code even where the CPU has AVX-512: on a 2-core
AMD EPYC (Zen 5) it ran the products of a 4-group LSTM at about 200 GFLOP/s, while
oneDNN, the other library PyTorch ships (``torch.nn.LSTM`` runs on it), ran the same
products at 430-470.  PyTorch gives dense tensors oneDNN's fp32 inner product as
``torch.ops.mkldnn._linear_pointwise`` (an op of TorchInductor's CPU backend; y = x W^T
+ b, W in ``nn.Linear``'s layout, read through its strides).

:func:`project_groups` computes the projection of every group, gx[k] = x_k W_ih[k]^T +
b_ih[k] (the block-diagonal input weights of Gao et al., NAACL 2018, Eq. 4-5), one
oneDNN call per group, and in the backward the input gradient the same way (dx_k = dgx[k]
W_ih[k]) and the weight gradient (:func:`weight_grad`, by oneDNN's own weight-gradient op
where it pays).  :func:`grouped_linear` wraps them for autograd (one [K, N, O] result).
The C++ scan takes the groups' results apart (:class:`grnn_fairseq.engine.CppProjectedScan`),
and its backward writes the gate gradients transposed as well, from which
:func:`weight_grad_t` computes dW_ih and the scan's dW_hh (which the C++ backward is then
not asked for) as products of plain matrices.

On Intel CPUs it is the other way round: MKL runs its AVX-512 code there, and on this
project's 2-core Intel Xeon (AVX-512, AMX) it ran 35 of 36 such products 3-70% faster than
oneDNN (``results/cpu_gemm_intel.txt``), and the issue's 4-group layer trained 9-13% and
decoded 9-17% faster on MKL.  On an AMD Zen 4 (AVX-512 on 256-bit units) oneDNN was the
faster one for 16 of the 18 (``results/cpu_gemm_zen4.txt``), as on the Zen 5.  What
oneDNN wins by on AMD CPUs is AVX-512: on the same Zen 4 with oneDNN held to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``) and the C++ tile too (``GRNN_CPU_ISA=avx2``), a stand-in for
an AVX2-only AMD CPU such as the Zen 3 whose targets were met on MKL, MKL trained the
4-group layer 2-7% and the 16-group one 5-17% faster in four rounds out of four
(``results/cpu_gemm_zen4.txt``, part 3).

``$GRNN_CPU_GEMM`` picks the library: ``auto`` (the default: oneDNN on x86 CPUs of other
vendors than Intel that have AVX-512 (:func:`cpu_vendor`, :func:`cpu_has_avx512`), where
this PyTorch has it and it passes a check at first use; elsewhere MKL), ``onednn``
(oneDNN, or a ConfigError saying why it cannot run) or ``blas`` (PyTorch's products).
``onednn`` follows the same size rules as ``auto``.  oneDNN takes a product only when a
group's multiply-adds reach :data:`MIN_MACS` (a call costs about 12 us more than MKL's, so
decoding steps of small batches keep MKL), and a shape only after its first :data:`REUSE`
products (on MKL) unless it is large (:data:`FIRST_MACS`).  Not under autocast (the products then
run in autocast's dtype, as PyTorch's would).
"""
import os

import torch

from ..errors import ConfigError

MODES = ("auto", "onednn", "blas")
# a group's multiply-adds from which oneDNN takes the product: below it, the per-call
# overhead (about 12 us) ate the gain on the Zen 5 machine (results/cpu_onednn_ab.txt)
MIN_MACS = 1 << 24
# oneDNN compiles a kernel for every new shape and caches it (about 0.3-1 ms for these).
# fairseq's batches change the number of rows N from batch to batch, and a 4-group
# IWSLT-sized encoder (N of about 1,000, 32M multiply-adds per group) uses each shape in
# only two or four products per batch: through oneDNN it trained 1-7% slower.  So the
# first REUSE products of a shape keep MKL unless all its groups' multiply-adds reach
# FIRST_MACS (where the compile is small beside the gain); later ones (a decoder's steps
# within a batch, a fixed-shape benchmark) go to oneDNN.
FIRST_MACS = 1 << 28
REUSE = 3
# a group's multiply-adds from which weight_grad takes oneDNN's own weight gradient
# without the bias gradient (its operands are copied into oneDNN's layout, which smaller
# products did not repay: at 25M 5.7 ms against 4.9 at K=16 on the Zen 5)
WEIGHT_GRAD_MACS = 1 << 25
SEEN_MAX = 256  # shapes counted (oneDNN's own cache holds 1,024 kernels)
calls = 0  # products oneDNN has computed (forward and backward), for tests and benchmarks
_seen = {}  # shape -> products so far, oldest first

_probe = None  # None: not checked yet; else "" (works) or why it does not
_vendor = None  # None: not read yet; else the CPU's vendor id ("" where unknown)
_avx512 = None  # None: not read yet; else whether the CPU's flags include avx512f
INTEL = "GenuineIntel"
CPUINFO = "/proc/cpuinfo"


def mode(environ=os.environ):
    """$GRNN_CPU_GEMM, checked: one of :data:`MODES` (unset or empty: auto)."""
    value = environ.get("GRNN_CPU_GEMM", "") or "auto"
    if value not in MODES:
        raise ConfigError(f"GRNN_CPU_GEMM={value!r} is not one of {', '.join(MODES)} (the "
                          "library of the recurrent layers' large fp32 products on the CPU); "
                          "unset it for auto")
    return value


def _read_cpuinfo():
    """Read the first processor's vendor id and flags from /proc/cpuinfo into
    ``_vendor`` and ``_avx512`` ("" and False where the file or the field is missing)."""
    global _vendor, _avx512
    vendor, avx512 = "", False
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():  # the blank line after the first processor
                    break
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id":
                    vendor = value.strip()
                elif key == "flags":
                    avx512 = "avx512f" in value.split()
    except OSError:
        pass
    _vendor, _avx512 = vendor, avx512


def cpu_vendor():
    """The CPU's vendor id as the kernel reports it ("GenuineIntel", "AuthenticAMD", ...;
    "" where /proc/cpuinfo has none, e.g. not Linux, or an ARM CPU)."""
    if _vendor is None:
        _read_cpuinfo()
    return _vendor


def cpu_has_avx512():
    """Whether /proc/cpuinfo lists AVX-512 (``avx512f``) for the CPU (False without it)."""
    if _avx512 is None:
        _read_cpuinfo()
    return _avx512


def _choice(environ=os.environ):
    """$GRNN_CPU_GEMM with ``auto`` resolved by the CPU: "onednn" or "blas" (oneDNN's
    availability not yet checked).  ``auto`` is oneDNN only on x86 CPUs of other vendors
    than Intel with AVX-512, where MKL runs its AVX2 code and oneDNN AVX-512's; on Intel
    CPUs and without AVX-512 MKL was as fast or faster (see the module's docstring)."""
    choice = mode(environ)
    if choice == "auto":
        vendor = cpu_vendor()
        return "onednn" if vendor and vendor != INTEL and cpu_has_avx512() else "blas"
    return choice


def _linear(x, w, b=None):
    global calls
    calls += 1
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _linear_weight_grad(d, x, bias):
    """oneDNN's inner-product weight gradient: d [N, O], x [N, I] (any strides) -> dW =
    d^T x [O, I] and, where ``bias``, db = d's column sums [O].  ``aten::
    mkldnn_linear_backward_weights`` takes its operands in oneDNN's layout (a copy each)
    and returns dense results when its third argument (only read for that) is dense."""
    global calls
    calls += 1
    return torch.ops.aten.mkldnn_linear_backward_weights(d.to_mkldnn(), x.to_mkldnn(),
                                                         d.new_empty(0), bias)


def unavailable():
    """Why oneDNN's products cannot run here ("" when they can): PyTorch built without
    oneDNN, no ``mkldnn::_linear_pointwise``, or a result of it (also with a transposed
    view as its weight, as :func:`weight_grad_t` calls it) or of the weight-gradient op
    (:func:`_linear_weight_grad`) that differs from PyTorch's products (checked once, on
    small products)."""
    global _probe
    if _probe is None:
        if not torch.backends.mkldnn.is_available():
            _probe = "this PyTorch is built without oneDNN (torch.backends.mkldnn)"
        elif not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            _probe = f"torch {torch.__version__} has no op mkldnn::_linear_pointwise"
        else:
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(s, generator=g) for s in ((37, 2, 24), (40, 24), (40,)))
            d = torch.randn(37, 40, generator=g)
            op = "mkldnn::_linear_pointwise"
            try:
                got = _linear(x[:, 1], w, b)
                want = torch.addmm(b.double(), x[:, 1].double(), w.t().double())
                ok = got.shape == want.shape and torch.allclose(got.double(), want, atol=1e-4)
                want = d.double().t() @ x[:, 1].double()
                if ok:  # weight_grad_t's form: a transposed view as the "weight"
                    op = "mkldnn::_linear_pointwise (transposed weight)"
                    got = _linear(d.t().contiguous(), x[:, 1].contiguous().t())
                    ok = got.shape == want.shape and torch.allclose(got.double(), want,
                                                                    atol=1e-4)
                if ok:
                    op = "aten::mkldnn_linear_backward_weights"
                    dw, db = _linear_weight_grad(d, x[:, 1], True)
                    ok = (dw.shape == want.shape and db.shape == (40,)
                          and torch.allclose(dw.double(), want, atol=1e-4)
                          and torch.allclose(db.double(), d.double().sum(0), atol=1e-4))
                _probe = "" if ok else f"{op} gave wrong results here"
            except (RuntimeError, AttributeError) as e:  # AttributeError: no such op
                _probe = f"{op} failed here: {e}"
    return _probe


def library(environ=os.environ):
    """What computes the large fp32 products here: "onednn" or "blas" (PyTorch's
    products: $GRNN_CPU_GEMM=blas, ``auto`` where :func:`_choice` picks them, or oneDNN
    unavailable).  Benchmarks print it."""
    choice = _choice(environ)
    return "onednn" if choice != "blas" and not unavailable() else "blas"


def wanted(x, weight):
    """Whether :func:`grouped_linear` should compute x's projection by ``weight``
    ([K, O, I/K]): fp32 CPU tensors, no autocast, at least :data:`MIN_MACS` per group, a
    shape used :data:`REUSE` times before or :data:`FIRST_MACS` in all, and $GRNN_CPU_GEMM
    allowing it (``auto``: see :func:`_choice`; ``onednn`` where oneDNN cannot run:
    ConfigError)."""
    if _choice() == "blas" or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    why = unavailable()
    if why and mode() == "onednn":
        raise ConfigError(f"GRNN_CPU_GEMM=onednn: {why}; unset it (or set blas) to use "
                          "PyTorch's products")
    macs = x.shape[0] * weight.shape[1] * weight.shape[2]
    if why or macs < MIN_MACS:
        return False
    if macs * weight.shape[0] >= FIRST_MACS:
        return True
    shape = (x.shape[0],) + tuple(weight.shape)
    seen = _seen.get(shape, 0)
    if seen >= REUSE:
        return True
    _seen[shape] = seen + 1
    if len(_seen) > SEEN_MAX:
        del _seen[next(iter(_seen))]
    return False


class GroupedLinear(torch.autograd.Function):
    """x [N, K*I], weight [K, O, I], bias [K, O] -> [K, N, O]: group k's projection
    x[:, k*I:(k+1)*I] weight[k]^T + bias[k], by oneDNN (forward, input and weight
    gradients; the bias gradient a sum)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        parts = project_groups(x, weight, bias)
        return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d):
        x, weight = ctx.saved_tensors
        k, _, i = weight.shape
        d = d.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = input_grad(d, weight)
        if ctx.needs_input_grad[1]:
            dw, db = weight_grad(d, x, ctx.needs_input_grad[2])
        elif ctx.needs_input_grad[2]:
            db = d.sum(1)
        return dx, dw, db


def project_groups(x, weight, bias):
    """x [N, K*I], weight [K, O, I], bias [K, O] -> the K groups' projections x_k
    weight[k]^T + bias[k], each [N, O] (no autograd: :class:`GroupedLinear` and the C++
    scan's :class:`~grnn_fairseq.engine.CppProjectedScan` wrap it)."""
    k, _, i = weight.shape
    if k == 1:
        return [_linear(x, weight[0], bias[0])]
    xk = x.view(x.shape[0], k, i)
    return [_linear(xk[:, g], weight[g], bias[g]) for g in range(k)]


def input_grad(d, weight):
    """d [K, N, O] (contiguous), weight [K, O, I] -> dx [N, K*I]: dx_k = d[k] weight[k]
    (weight[k]^T as oneDNN's "weight", read through its strides)."""
    if weight.shape[0] == 1:
        return _linear(d[0], weight[0].t())
    return torch.cat([_linear(d[g], weight[g].t()) for g in range(weight.shape[0])], 1)


def weight_grad(d, x, bias=False):
    """d [K, N, O] (contiguous), x [N, K*I] -> dW [K, O, I], dW[k] = d[k]^T x_k; with
    ``bias`` -> (dW, db [K, O]), db[k] the column sums of d[k].

    With ``bias``, or for groups of at least :data:`WEIGHT_GRAD_MACS` multiply-adds, oneDNN's
    weight gradient (:func:`_linear_weight_grad`; db from the same pass); else dW[k]^T =
    x_k^T d[k] through ``_linear_pointwise``, both operands plain transposes of contiguous
    matrices (x's groups copied apart first: oneDNN took seconds over a strided slice of
    x), the [I, O] results transposed into place, db a sum.  On the Zen 5 at T*B = 1600, H
    = 1024, bias included: K=1 33 ms against 43 the second way (MKL: 61), K=4 8.8 against
    11.5 (16.4), K=16 4.1 against 5.1."""
    k, n, o = d.shape
    if bias or n * o * x.shape[1] // k >= WEIGHT_GRAD_MACS:
        xg = x.view(n, k, -1)
        grads = [_linear_weight_grad(d[g], xg[:, g], bias) for g in range(k)]
        dw = torch.stack([dw for dw, _ in grads])
        return (dw, torch.stack([db for _, db in grads])) if bias else dw
    xk = x.view(n, k, -1).transpose(0, 1).contiguous()
    dw = torch.stack([_linear(xk[g].t(), d[g].t()).t() for g in range(k)])
    return (dw, d.sum(1)) if bias else dw


def weight_grad_t(d_t, x, bias=False):
    """d_t [K, O, N] (the gate gradients transposed, contiguous, as the C++ backward writes
    them), x [N, K*I] -> dW [K, O, I], dW[k] = d_t[k] x_k; with ``bias`` -> (dW, db [K, O]),
    db[k] the row sums of d_t[k].

    One ``_linear_pointwise`` per group, d_t[k] as its input and x_k^T, a transposed view
    of x's groups copied apart, as its "weight" (which oneDNN reorders anyway): no operand
    is copied into oneDNN's layout, and the products come out in place.  On the Zen 5 at
    N = 1600, H = 1024, against :func:`weight_grad` of the untransposed gradients: K=1 about
    31 ms against 36, K=4 9 against 10.5, K=16 3 against 4.7; the C++ backward's
    transposes cost 1-2 ms (results/cpu_transposed_gates_ab.txt)."""
    k, o, n = d_t.shape
    xk = x.view(n, k, -1).transpose(0, 1).contiguous()
    dw = torch.stack([_linear(d_t[g], xk[g].t()) for g in range(k)])
    return (dw, d_t.sum(2)) if bias else dw


def grouped_linear(x, weight, bias):
    """The projection of :class:`GroupedLinear` (autograd included)."""
    return GroupedLinear.apply(x, weight, bias)
