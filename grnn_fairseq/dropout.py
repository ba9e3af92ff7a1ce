"""The models' dropout: fairseq's ``FairseqDropout`` (so ``--retain-dropout`` and
``--retain-dropout-modules`` work as for fairseq's models), with a faster CPU path.

    y = x * m / (1 - p),   m_e ~ Bernoulli(1 - p) independently   (Srivastava et al. 2014)

On the CPU, in float32 and float64, the mask comes from a counter-based random stream
(Philox4x32-10, ``kernels/dropout_cpu.cpp``) under a 64-bit seed drawn from torch's
default CPU generator at every call, so ``torch.manual_seed`` (fairseq's ``--seed``) makes
runs repeatable as before.  The mask is a function of the seed and the element's index:
the backward recomputes it (nothing is stored), any number of threads gives the same mask,
and the draw vectorises.  torch's CPU ``bernoulli_`` draws one number at a time from one
generator, about 9 ns an element; without it RNNSearch's training steps are 4-6% faster
(results/cpu_dropout_e2e.txt).  The masks differ from torch's (another sample of the same
distribution).

It runs on CPU tensors wherever the C++ library of the recurrences loads, whatever
``GRNN_BACKEND`` says (so an A/B of recurrence backends sees the same masks);
``GRNN_CPU_DROPOUT=0`` keeps ``F.dropout`` (for A/B measurements).  Elsewhere (CUDA, half
precision, no C++ compiler) it is fairseq's ``F.dropout``.
"""
import os

import torch
from fairseq.modules import FairseqDropout

from .engine import CPP_DTYPES
from .errors import ConfigError, switch

VARIANT = {"dropout": os.environ.get("GRNN_CPU_DROPOUT", "1")}


def cpu_dropout_on():
    """Whether VARIANT['dropout'] is on (GRNN_CPU_DROPOUT, checked)."""
    return switch("GRNN_CPU_DROPOUT", VARIANT["dropout"])


def seeded(x):
    """Whether the dropout of ``x`` takes the seeded C++ path (see the module's text)."""
    from .kernels import cpu_rnn

    return (x.device.type == "cpu" and x.dtype in CPP_DTYPES and cpu_dropout_on()
            and cpu_rnn.available())


class _SeededDropout(torch.autograd.Function):
    """y = x * m(seed) / (1 - p); its gradient is the same map of dy (the same mask)."""

    @staticmethod
    def forward(ctx, x, p, seed):
        from .kernels import cpu_rnn

        ctx.p, ctx.seed = p, seed
        return cpu_rnn.load().seeded_dropout(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        return _SeededDropout.apply(dy, ctx.p, ctx.seed), None, None


def seeded_dropout(x, p, seed=None):
    """Dropout of ``x`` (float32 / float64, CPU) at rate p in (0, 1) with the mask of
    ``seed`` (an integer in [0, 2^63); None: drawn from torch's default CPU generator)."""
    if not 0.0 < p < 1.0:
        raise ConfigError(f"seeded_dropout: p={p!r} must be in (0, 1)")
    if seed is None:
        seed = int(torch.empty((), dtype=torch.int64).random_())
    return _SeededDropout.apply(x, float(p), seed)


class Dropout(FairseqDropout):
    """``FairseqDropout`` whose CPU float32 / float64 path is :func:`seeded_dropout`."""

    def forward(self, x, inplace: bool = False):
        if self.p > 0 and (self.training or self.apply_during_inference) and not inplace \
                and seeded(x):
            return seeded_dropout(x, self.p)
        return super().forward(x, inplace=inplace)
