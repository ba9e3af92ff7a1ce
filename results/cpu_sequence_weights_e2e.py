"""A/B of the recurrent weight gradients in RNNSearch's CPU training step: per target
position, added up by autograd (before 2026-12-06, session 23) against once per sequence
(``engine.step_weights`` -> ``engine.CppTrainStep``, see cpu_sequence_weights_ab.py),
through whole training steps on real batches of the Debian De-En corpus
(debian_training_setup.ab).

    OMP_NUM_THREADS=2 python results/cpu_sequence_weights_e2e.py ARCH
"""
import sys

from debian_training_setup import ab
from grnn_fairseq import engine

library = engine.step_weights


def use(fn):
    def switch_on():
        engine.step_weights = fn
    return switch_on


ab(sys.argv[1], {"per_position": use(lambda weights, cell, backend=None: weights),
                 "once": use(library)})
