"""Fused kernels of the recurrence engine, loaded on demand by :mod:`grnn_fairseq.engine`:

* :mod:`.triton_rnn`: the GPU LSTM, GRU and Elman RNN in Triton (optional: needs Triton);
* :mod:`.cpu_rnn`: the CPU loops of the same cells in C++ (``rnn_cpu.cpp``, compiled at
  first use; needs a C++ compiler and ninja);
* :mod:`.onednn`: the recurrent layers' large fp32 products on the CPU through oneDNN.

Importing this package itself needs neither Triton nor a compiler.
"""
