"""A/B of RNNSearch's attention in CPU training: PyTorch's ops per target position
(``GRNN_CPU_ATTENTION=0``, the path before 2026-12-07, session 24) against one C++ pass
each way (``kernels/attention_cpu.cpp``, the default), through whole training steps on
real batches of the Debian De-En corpus (debian_training_setup.ab).

    OMP_NUM_THREADS=2 python results/cpu_fused_attention_e2e.py ARCH
"""
from debian_training_setup import ab_switch
from grnn_fairseq.kernels import cpu_attention

ab_switch(cpu_attention.VARIANT, "attention", "torch_ops", "fused")
