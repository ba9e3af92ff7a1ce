"""Fused GPU kernels of the recurrence engine (optional: they need Triton).

:mod:`.triton_lstm` is imported on demand by :mod:`grnn_fairseq.engine`; importing this
package itself never requires Triton.
"""
