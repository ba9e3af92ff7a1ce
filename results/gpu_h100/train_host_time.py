"""Host time of RNNSearch's decoder in training (forward and backward of a batch, per
target position), with PyTorch's operators, the fused training step
(GRNN_TRITON_TRAIN_STEP=1) and the fused attention (GRNN_TRITON_ATTENTION=1), measured
without a GPU: what the decoder's step-by-step training costs the host on a GPU, where it
is host-bound (results/README.md, "The GPU (one H100), and the switches prepared since").

As decode_host_time.py: the CUDA code path runs on CPU tensors at a tiny width (16), so
each operator costs about its dispatch, as a launch does on the host, and the Triton
launches are no-ops (launch_count.py).  The encoder runs once, outside the time and the
CUDA path; its outputs are leaves of the decoder's graph.  Timed: the decoder's forward,
the log-softmax loss and the backward, per target position (the difference between 20 and
10 target positions, / 10: work once per batch left out), dropout on; WMT14-like depth (4
layers each side), 8 sentences; the cases round-robin.  From the repository root:

    OMP_NUM_THREADS=1 python results/gpu_h100/train_host_time.py
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

import torch  # noqa: E402

from test_models import build_mt, prev_tokens, source_batch  # noqa: E402

from grnn_fairseq.kernels import triton_attention, triton_rnn  # noqa: E402
from launch_count import cuda_path, no_launches, round_robin  # noqa: E402

ROUNDS = 15
WIDE = ["--encoder-layers", "4", "--decoder-layers", "4"]
MODES = {"separate ops": ("0", "0"), "fused step": ("1", "0"),
         "fused step + attention": ("1", "1")}


def make_case(cell, groups, mode, t_len):
    """-> a call that runs the decoder's forward and backward and returns its seconds."""
    torch.manual_seed(0)
    model = build_mt(cell=cell, groups=groups, dropout=0.2, extra=WIDE).train()
    _, src, lengths = source_batch((9, 8, 7, 7, 5, 4, 3, 2), seed=5)
    with cuda_path(False):
        out = model.encoder(src, lengths)
    encoder_out = {k: v.detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point()
                   else v for k, v in out.items()}
    prev = prev_tokens(src.shape[0], t_len)

    def run():
        triton_rnn.VARIANT["train_step"], triton_attention.VARIANT["attention"] = MODES[mode]
        t0 = time.perf_counter()
        logits, _ = model.decoder(prev, encoder_out)
        torch.log_softmax(logits, -1).sum().backward()
        return time.perf_counter() - t0
    return run


no_launches()
CONFIGS = [(cell, k) for cell in ("lstm", "gru") for k in (1, 4)]
LENGTHS = (10, 20)
with cuda_path():
    cases = [make_case(cell, k, mode, t) for cell, k in CONFIGS for mode in MODES
             for t in LENGTHS]
    times = round_robin(cases, ROUNDS)
med = [statistics.median(ts) for ts in times]
print(f"host time of RNNSearch's decoder in training, forward + loss + backward, per target "
      f"position (µs; the medians of {ROUNDS} rounds at {LENGTHS[1]} and {LENGTHS[0]} "
      f"positions, their difference / {LENGTHS[1] - LENGTHS[0]}; the cases round-robin); "
      f"4 decoder layers at width 16, 8 sentences, dropout 0.2, "
      f"{torch.get_num_threads()} thread(s); launches are no-ops")
print(f"{'cell':<5} {'K':>2} " + " ".join(f"{m:>22}" for m in MODES) + f" {'ratio':>6}")
i = 0
for cell, k in CONFIGS:
    per = []
    for _ in MODES:
        short, long = med[i], med[i + 1]
        per.append((long - short) / (LENGTHS[1] - LENGTHS[0]) * 1e6)
        i += 2
    print(f"{cell:<5} {k:>2} " + " ".join(f"{p:>22.0f}" for p in per)
          + f" {per[0] / per[-1]:>6.2f}")
print("(ratio: separate ops / fused step + attention)")
