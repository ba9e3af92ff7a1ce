"""Kernel launches and host-side operator calls per target position of RNNSearch's decoder
in training (forward and backward), LSTM and GRU, counted without a GPU.

On the GPU, fairseq training of RNNSearch is bound by the host: the decoder runs step by
step (input feeding and attention prevent a scan), and every operator of every step is a
kernel launch of a few microseconds of host time, while the arithmetic of a step takes
less (results/gpu_h100/README.md).  So what a change of the decoder's step saves there is
counted here: the model runs on the CPU with the CUDA code path (GRNN_BACKEND=triton, the
Triton kernels in Triton's interpreter), every operator that reaches the dispatcher is
recorded, and each Triton kernel counts as one launch (the interpreter's own work is not
recorded).  Launches = operators that run a kernel on a GPU: views, allocations and other
metadata operators are listed apart.

Counts per target position are the difference between 10 and 5 target positions, / 5
(work done once per sentence batch, such as the weight gradients of the fused training
step, computed once for all positions, is left out).
The sizes do not change the counts: WMT14-like depth (4 layers each side) at width 32.

    python results/gpu_h100/step_launches.py > results/gpu_h100/step_launches.txt
"""
import collections
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ["GRNN_BACKEND"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from test_models import build_mt, prev_tokens, source_batch  # noqa: E402

from grnn_fairseq.kernels import triton_attention, triton_rnn  # noqa: E402
from launch_count import Recorder, count_triton_kernels, launches, NO_KERNEL  # noqa: E402

MODES = {"separate": ("0", "0", "separate autograd ops (default)"),
         "step": ("1", "0", "fused training step (GRNN_TRITON_TRAIN_STEP=1)"),
         "step+attention": ("1", "1", "fused step and attention (+ATTENTION=1)")}


def count(cell, groups, mode, t_len):
    """-> (forward Counter, backward Counter) of one training forward + backward."""
    triton_rnn.VARIANT["train_step"], triton_attention.VARIANT["attention"], _ = MODES[mode]
    torch.manual_seed(0)
    model = build_mt(cell=cell, groups=groups, dropout=0.2, extra=[
        "--encoder-layers", "4", "--decoder-layers", "4", "--encoder-embed-dim", "32",
        "--decoder-embed-dim", "32", "--encoder-hidden-size", "32",
        "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32",
        "--attention-dim", "32"])
    model.train()
    _, src, lengths = source_batch()
    prev = prev_tokens(src.shape[0], t_len)
    forward, backward = Recorder(), Recorder()
    CURRENT[0] = forward
    with forward:
        logits, _ = model(src, lengths, prev)
        loss = torch.log_softmax(logits, -1).sum()
    CURRENT[0] = backward
    with backward:
        loss.backward()
    CURRENT[0] = None
    return forward.ops, backward.ops


def per_position(cell, groups, mode):
    (f5, b5), (f10, b10) = (count(cell, groups, mode, t) for t in (5, 10))
    out = []
    for a, b in ((f10, f5), (b10, b5)):
        diff = collections.Counter(a)
        diff.subtract(b)
        out.append({k: v / 5 for k, v in diff.items() if v})
    return out


CURRENT = [None]
count_triton_kernels(CURRENT)

print("per target position of RNNSearch's decoder in training (4 decoder layers,")
print("rearrangement 'both', dropout on): operators with a GPU kernel (launches) / all")
print("operators that reach the dispatcher (host calls), forward and backward")
print()
print(f"{'cell':<5} {'decoder step':<48} {'K':>2} {'fwd launches':>12} {'bwd launches':>12} "
      f"{'fwd calls':>9} {'bwd calls':>9}")
detail = []
for cell in ("lstm", "gru"):
    for mode, (_, _, label) in MODES.items():
        for k in (1, 4):
            fwd, bwd = per_position(cell, k, mode)
            print(f"{cell:<5} {label:<48} {k:>2} {launches(fwd):>12.1f} {launches(bwd):>12.1f} "
                  f"{sum(fwd.values()):>9.1f} {sum(bwd.values()):>9.1f}", flush=True)
            detail.append((cell, label, k, fwd, bwd))
print()
print("launching operators per target position, by name:")
for cell, label, k, fwd, bwd in detail:
    for part, ops in (("fwd", fwd), ("bwd", bwd)):
        names = ", ".join(f"{n} {v:g}" for n, v in sorted(ops.items(), key=lambda x: -x[1])
                          if n not in NO_KERNEL)
        print(f"  {cell}, {label}, K={k}, {part}: {names}")
