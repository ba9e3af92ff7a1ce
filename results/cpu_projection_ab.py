"""A/B of the K = 1 input projection with autograd, in RNNSearch's CPU training step:
``torch.addmm`` on the selected weight matrix (before 2026-12-06, session 20) against the
batched product of one group (``engine.project_input`` now), through whole training
steps on real batches of the Debian De-En corpus (debian_training_setup.ab).

    OMP_NUM_THREADS=2 python results/cpu_projection_ab.py rnnsearch
"""
import sys

import torch

from debian_training_setup import ab
from grnn_fairseq import engine

batched = engine.project_input


def selected(x, weight_ih, bias_ih):
    """project_input before: K = 1 always through addmm on weight_ih[0]."""
    if weight_ih.shape[0] == 1:
        return torch.addmm(bias_ih[0], x, weight_ih[0].t()).unsqueeze(0)
    return batched(x, weight_ih, bias_ih)


def use(fn):
    def switch_on():
        engine.project_input = fn
    return switch_on


ab(sys.argv[1], {"selected": use(selected), "batched": use(batched)})
