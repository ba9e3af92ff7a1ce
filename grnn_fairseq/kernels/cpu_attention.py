"""RNNSearch's additive attention of one target position as one C++ pass each way on the
CPU (``attention_cpu.cpp``, built into the library of :mod:`grnn_fairseq.kernels.cpu_rnn`).

    e_ij = v^T tanh(q_i + k_j)      alpha_ij = softmax_j(e_ij)      c_i = sum_j alpha_ij h_j

PyTorch's ops make the [S, B, A] pre-activations, their tanh and, in the backward, their
gradients, and autograd adds an [S, B, A] keys' gradient at every position; here each
query row reads its source's keys and values once each way, and a sequence's keys' and v's
gradients are added in place (``attention.KeyGrads``), as the Triton kernels do on the GPU.
Used where the recurrence runs on the ``cpp`` backend, in float32 and float64, outside
autocast; ``GRNN_CPU_ATTENTION=0`` keeps PyTorch's ops (for A/B measurements).

The interface of :mod:`grnn_fairseq.kernels.triton_attention`, for ``attention._FusedAttention``:
:func:`forward`, :func:`backward` and :func:`sum_dtype`.
"""
import os

import torch

from ..errors import switch
from . import cpu_rnn

VARIANT = {"attention": os.environ.get("GRNN_CPU_ATTENTION", "1")}


def attention_on():
    """Whether VARIANT['attention'] is on (GRNN_CPU_ATTENTION, checked)."""
    return switch("GRNN_CPU_ATTENTION", VARIANT["attention"])


def sum_dtype(dtype):
    """The dtype in which a sequence's keys' and v's gradients are summed: the keys'."""
    return dtype


def forward(q, keys, v, values, mask, rows):
    """q [B, A], keys [S, N, A], v [A], values [S, N, V] (contiguous, one dtype), mask [S, N]
    or None (True = pad) -> (context [B, V], alpha [S, B]), both in that dtype."""
    return cpu_rnn.load().attention_forward(q, keys, v, values, mask, rows)


def backward(d_context, d_weights, weights, q, keys, v, values, rows, keys_mode, d_keys,
             dv_rows):
    """-> (dq [B, A], d_keys, dv_rows [B, A]).  keys_mode 0: no keys' gradient; 1: a new
    one; 2: added into ``d_keys``, and the rows' shares of dv into ``dv_rows`` (a
    sequence's sums)."""
    if keys_mode == 1:
        d_keys = torch.zeros_like(keys)
    if dv_rows is None:
        dv_rows = torch.zeros_like(q)
    d_q = cpu_rnn.load().attention_backward(
        d_context, d_weights, weights, q, keys, v, values,
        d_keys if keys_mode else None, dv_rows, rows)
    return d_q, d_keys, dv_rows
