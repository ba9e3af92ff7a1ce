"""A/B of the rearrangement between layers in RNNSearch's decoder, trained step by step on
the CPU: the stack's step as before 2026-12-06 (session 21: each layer's output put in
unit order, a copy, then dropout and the shuffle, another copy) against the step now
(``RecurrentLayer.step(shuffle_out=True)``: the output made in the shuffled order with one
copy, then dropout), through whole training steps on real batches of the Debian De-En
corpus (debian_training_setup.ab).  Run with --dropout 0, so that both give the same
gradients (the order of dropout and shuffle changes which mask falls where).

    OMP_NUM_THREADS=2 python results/cpu_layer_shuffle_ab.py group_rnnsearch_k4 --dropout 0
"""
import sys

from debian_training_setup import ab
from grnn_fairseq.recurrent import RecurrentStack

now = RecurrentStack.step


def before(self, x_t, states, weights=None):
    """RecurrentStack.step before session 21."""
    new_states = []
    for i, layer in enumerate(self.layers):
        x_t, s = layer.step(self._layer_input(i, x_t), states[i],
                            None if weights is None else weights[i])
        new_states.append(s)
    return x_t, new_states


def use(fn):
    def switch_on():
        RecurrentStack.step = fn
    return switch_on


ab(sys.argv[1], {"before": use(before), "now": use(now)})
