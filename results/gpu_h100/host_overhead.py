"""Host (Python) time of one decoding step of a one-layer group-LSTM stack on the triton
backend, with the kernel launch replaced by a no-op: what a GPU decoding step costs the
CPU besides the launch itself.  Runs on any machine: CPU tensors, with the backend forced
to triton (not through TRITON_INTERPRET, which would change Triton's own host helpers).
From the repository root:

    python results/gpu_h100/host_overhead.py
"""
import time

import torch

from grnn_fairseq import engine
try:  # the kernels' module was renamed when the GRU joined it
    from grnn_fairseq.kernels import triton_rnn as triton_lstm
except ImportError:
    from grnn_fairseq.kernels import triton_lstm
from grnn_fairseq.recurrent import RecurrentStack


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


if hasattr(triton_lstm, "_decode_step"):  # one kernel for both cells since the GRU
    triton_lstm._decode_step = _NoLaunch()
else:
    triton_lstm._lstm_decode_step = _NoLaunch()
engine.resolve_backend = lambda *args, **kwargs: "triton"
engine._interpreting = lambda: True  # let fused_step take CPU tensors
stack = RecurrentStack(1024, 1024, 1, "lstm", groups=4, rearrangement="time", backend="triton")
x = torch.randn(320, 1024)
states = [s[0] for s in stack.zero_state(320, x)]
times = []
with torch.no_grad():
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(2000):
            stack.step(x, states)
        times.append((time.perf_counter() - t0) / 2000 * 1e6)
times.sort()
print(f"stack.step host time, 1 layer, K=4, batch 320: median {times[3]:.1f} us, "
      f"min {times[0]:.1f} us (7 x 2000 steps)")
