"""Fused kernels of the recurrence engine, loaded on demand by :mod:`grnn_fairseq.engine`:

* :mod:`.triton_rnn`: the GPU LSTM and GRU in Triton (optional: needs Triton);
* :mod:`.cpu_lstm`: the CPU LSTM loops in C++ (``lstm_cpu.cpp``, compiled at first use;
  needs a C++ compiler and ninja).

Importing this package itself needs neither Triton nor a compiler.
"""
