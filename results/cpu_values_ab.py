"""A/B of the attention values' gradient in RNNSearch's CPU training step: summed by
autograd over the target positions (before 2026-12-06, session 20: a full [S, B, V]
tensor made and added at every position) against ``AdditiveAttention.sequence_values``
(one batched product for all positions), through whole training steps on real batches
of the Debian De-En corpus (debian_training_setup.ab).

    OMP_NUM_THREADS=2 python results/cpu_values_ab.py group_rnnsearch_k4
"""
import sys

from debian_training_setup import ab
from grnn_fairseq.attention import AdditiveAttention

deferred = AdditiveAttention.sequence_values


def use(fn):
    def switch_on():
        AdditiveAttention.sequence_values = staticmethod(fn)
    return switch_on


ab(sys.argv[1], {"per_position": use(lambda values: (values, None)),
                 "once": use(deferred)})
