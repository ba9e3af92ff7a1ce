"""A/B of a group decoder's training step on the CPU (2026-11-23): the `cpp` engine's scan of
one step (one autograd node) against the autograd ops that ran before (the `reference`
backend's step, which is the former code path), side by side in one run.

Shape of RNNSearch's decoder at IWSLT sizes: two LSTM layers of 256, input 640 (embedding
128 + context 512), batch 32, 25 steps chained, dropout 0.3 between the layers, forward and
backward; median of 10 timed repetitions after 2, cases alternating.  At K = 1 the library
keeps the autograd ops, so there the script forces the C++ scan of one step
(``engine._step_cpp_scan``) in place of ``engine.recurrent_step`` for its second column.

    python results/cpu_training_step_ab.py [threads]     # output: cpu_training_step_ab.txt
"""
import sys
import time

import torch

from grnn_fairseq import engine
from grnn_fairseq.recurrent import RecurrentStack

library_step = engine.recurrent_step


def forced_step(gx_t, state, weight_hh_t, bias_hh, cell, time_shuffle, backend=None):
    """The C++ scan of one step at any K (training steps only)."""
    return engine._step_cpp_scan(cell, gx_t, state, weight_hh_t, bias_hh, time_shuffle)

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
B, I, H, T, L = 32, 640, 256, 25, 2
print(f"torch {torch.__version__}, {threads} thread(s); B={B} I={I} H={H} T={T} layers={L}")
for k in (1, 4, 16):
    torch.manual_seed(0)
    stacks = {b: RecurrentStack(I, H, L, groups=k, dropout=0.3, backend=b)
              for b in ("reference", "cpp")}
    stacks["cpp"].load_state_dict(stacks["reference"].state_dict())
    xs = torch.randn(T, B, I, requires_grad=True)

    def run(stack):
        states = [tuple(t.requires_grad_() for t in s[0]) for s in stack.zero_state(B, xs)]
        weights, tops = stack.step_weights(), []
        for t in range(T):
            top, states = stack.step(xs[t], states, weights)
            tops.append(top)
        torch.stack(tops).sum().backward()

    times = {b: [] for b in stacks}
    for rep in range(12):
        for b, stack in stacks.items():
            engine.recurrent_step = forced_step if (b == "cpp" and k == 1) else library_step
            t0 = time.perf_counter()
            run(stack)
            times[b].append(time.perf_counter() - t0)
    engine.recurrent_step = library_step
    med = {b: sorted(v[2:])[len(v[2:]) // 2] * 1e3 for b, v in times.items()}
    print(f"K={k:2d}: autograd ops (before) {med['reference']:7.2f} ms   cpp scan of one step "
          f"{med['cpp']:7.2f} ms   before / after {med['reference'] / med['cpp']:.2f}x")
print("K = 1: the C++ column is forced by this script; the library keeps the autograd ops there.")
