"""A/B of the models' dropout in CPU training: torch's ``F.dropout`` (``GRNN_CPU_DROPOUT=0``,
the path before 2026-12-07, session 25; its mask from ``bernoulli_``, one number at a time)
against the seeded Philox dropout (``kernels/dropout_cpu.cpp``, the default), through whole
training steps on real batches of the Debian De-En corpus (debian_training_setup.ab).
The two draw different masks, so the "gradient difference" line compares different
dropout samples, not rounding.

    OMP_NUM_THREADS=2 python results/cpu_dropout_e2e.py ARCH
"""
from debian_training_setup import ab_switch
from grnn_fairseq import dropout

ab_switch(dropout.VARIANT, "dropout", "bernoulli", "seeded")
