"""A/B of the attention's query projection in RNNSearch's CPU training step: W s + b at
every target position with autograd summing dW and db over the positions (before
2026-12-06, session 21) against ``AdditiveAttention.sequence_projection`` (each position
hands (s, dq) over; dW and db once for all positions, one product over their rows),
through whole training steps on real batches of the Debian De-En corpus
(debian_training_setup.ab).

    OMP_NUM_THREADS=2 python results/cpu_query_projection_ab.py group_rnnsearch_k4
"""
import sys

from debian_training_setup import ab
from grnn_fairseq.attention import AdditiveAttention

deferred = AdditiveAttention.sequence_projection


def use(fn):
    def switch_on():
        AdditiveAttention.sequence_projection = fn
    return switch_on


ab(sys.argv[1], {"per_position": use(lambda self: None), "once": use(deferred)})
