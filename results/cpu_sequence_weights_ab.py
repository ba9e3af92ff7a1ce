"""A/B of a group decoder's training steps on the CPU (2026-12-06): the weight gradients
computed once per sequence (``engine.CppTrainStep`` with ``sequence_weights``, the
library's path on backend ``cpp``) against per step and added up by autograd
(the C++ scan of one step per position, the path before), side by side in one run.

Shapes of RNNSearch's decoder: two LSTM layers, the input the embedding + the context;
IWSLT sizes (H 256, input 640, batch 32) and WMT sizes (H 1000, input 2620, batch 16);
25 steps chained, dropout 0.3 between the layers, forward and backward; median of 10
timed repetitions after 2, cases alternating.  At K = 1 the path before is torch's
autograd ops (the library kept them there: one large product dominates).

    python results/cpu_sequence_weights_ab.py [threads]   # output: cpu_sequence_weights_ab.txt
"""
import sys
import time

import torch

from grnn_fairseq import engine
from grnn_fairseq.recurrent import RecurrentStack

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
T, L = 25, 2
print(f"torch {torch.__version__}, {threads} thread(s); T={T} layers={L}, LSTM, time shuffle")


def per_step_weights(stack):
    """The path before: plain weights; every step's backward computes its own weight
    gradients (the C++ scan of one step; at K = 1 torch's autograd ops)."""
    return [layer.directions[0]() for layer in stack.layers]


def sequence_weights(stack):
    """The library's path (StepWeights for engine.CppTrainStep)."""
    weights = stack.step_weights()
    assert all(w.engine == "cpp" for w in weights)
    return weights


for label, B, I, H, ks in (("IWSLT", 32, 640, 256, (1, 4, 16)), ("WMT", 16, 2620, 1000, (1, 4))):
    for k in ks:
        torch.manual_seed(0)
        stack = RecurrentStack(I, H, L, groups=k, dropout=0.3, backend="cpp")
        xs = torch.randn(T, B, I, requires_grad=True)

        def run(make_weights):
            states = [tuple(t.requires_grad_() for t in s[0]) for s in stack.zero_state(B, xs)]
            weights, tops = make_weights(stack), []
            for t in range(T):
                top, states = stack.step(xs[t], states, weights)
                tops.append(top)
            stack.zero_grad()
            torch.manual_seed(1)
            torch.stack(tops).square().sum().backward()
            return [p.grad.clone() for p in stack.parameters()]

        torch.manual_seed(2)
        a = run(per_step_weights)
        torch.manual_seed(2)
        b = run(sequence_weights)
        worst = max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a, b))
        times = {"per step": [], "per sequence": []}
        for rep in range(12):
            cases = [("per step", per_step_weights), ("per sequence", sequence_weights)]
            for name, make in (cases if rep % 2 == 0 else cases[::-1]):
                t0 = time.perf_counter()
                run(make)
                times[name].append(time.perf_counter() - t0)
        med = {n: sorted(v[2:])[len(v[2:]) // 2] * 1e3 for n, v in times.items()}
        print(f"{label} B={B} I={I} H={H} K={k:2d}: weight gradients per step "
              f"{med['per step']:8.2f} ms, per sequence {med['per sequence']:8.2f} ms, "
              f"before / after {med['per step'] / med['per sequence']:.2f}x "
              f"(largest gradient difference {worst:.0e} of the largest)")
