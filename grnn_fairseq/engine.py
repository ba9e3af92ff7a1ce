"""Recurrence engines: the time loop over canonical grouped weights.

``scan`` is the reference engine in plain PyTorch (the CPU path and the reference every
other engine is tested against).  Efficiency rules of the hot loop:

* the input projection of all T steps is one batched product, outside the loop
  (:func:`project_input`);
* the recurrent step is one batched product over the K groups (``torch.baddbmm`` on
  [K, B, m] x [K, m, G*m]);
* steps are visited with ``unbind`` and collected with ``stack``, so the backward pass
  allocates no full-size tensor per step.
"""
import torch

from .cells import POINTWISE
from .rearrangement import rearrange_grouped


def project_input(x, weight_ih, bias_ih):
    """Input projections of every position at once.

    x: [N, I]  weight_ih: [K, G*m, I/K]  bias_ih: [K, G*m]  ->  [K, N, G*m]
    """
    k = weight_ih.shape[0]
    if k == 1:
        return torch.addmm(bias_ih[0], x, weight_ih[0].t()).unsqueeze(0)
    xk = x.view(x.shape[0], k, -1).transpose(0, 1)  # [K, N, I/K]
    return torch.baddbmm(bias_ih.unsqueeze(1), xk, weight_ih.transpose(1, 2))


def recurrent_step(gx_t, state, weight_hh_t, bias_hh, cell, time_shuffle):
    """One step of the recurrence for every group.

    gx_t: [K, B, G*m]  state: tuple of [K, B, m]  weight_hh_t: [K, m, G*m] (transposed)
    bias_hh: [K, 1, G*m]  ->  (h_t [K, B, m], new state tuple)
    """
    h_prev = rearrange_grouped(state[0]) if time_shuffle else state[0]
    gh = torch.baddbmm(bias_hh, h_prev, weight_hh_t)
    return POINTWISE[cell](gx_t, gh, state)


def scan(gx, state, weight_hh, bias_hh, cell, time_shuffle=False, mask=None, reverse=False):
    """Run the recurrence over T steps.

    gx: [T, K, B, G*m] input projections (bias included)   state: tuple of [K, B, m]
    weight_hh: [K, G*m, m]   bias_hh: [K, G*m]   mask: [T, B] bool, True at real tokens
    (None: no padding)   reverse: visit t = T-1 .. 0.
    Returns (out [T, K, B, m], final state).  Padded steps keep the state unchanged and
    output zeros, so padding on either side never changes the results of real tokens.
    """
    w_t = weight_hh.transpose(1, 2)
    b = bias_hh.unsqueeze(1)
    steps = gx.unbind(0)
    masks = mask.unsqueeze(-1).unbind(0) if mask is not None else None  # each [B, 1]
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    outs = [None] * len(steps)
    for t in order:
        h, new_state = recurrent_step(steps[t], state, w_t, b, cell, time_shuffle)
        if masks is not None:
            keep = masks[t]
            new_state = tuple(torch.where(keep, n, s) for n, s in zip(new_state, state))
            h = h * keep
        state = new_state
        outs[t] = h
    return torch.stack(outs), state
