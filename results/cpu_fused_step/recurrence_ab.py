"""The recurrence alone (the C++ forward, no input projection), fused step vs two-pass step
(GRNN_CPU_FUSED=0), side by side in one process: median ms of 11 and GFLOP/s of the
recurrent products (2 * T * B * H * 4m).  T=50, B=32, H=1024, fp32, inference (save=0)
and training forward (save=1).

    python results/cpu_fused_step/recurrence_ab.py --threads 1
    python results/cpu_fused_step/recurrence_ab.py --loop 4   # for perf record: 200 calls
"""
import argparse
import os
import statistics
import time

import torch

from grnn_fairseq.kernels import cpu_rnn

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=1)
p.add_argument("--loop", type=int, help="only run 200 calls at this K (for a profiler)")
args = p.parse_args()
torch.set_num_threads(args.threads)
ops = cpu_rnn.load()
T, B, H = 50, 32, 1024


def problem(k):
    m = H // k
    return (torch.randn(k, T, B, 4 * m).transpose(0, 1), torch.zeros(k, B, m),
            torch.zeros(k, B, m), torch.randn(k, 4 * m, m) * 0.05, torch.randn(k, 4 * m))


def call(prob, save):
    ops.forward(*prob, None, True, False, save)


with torch.no_grad():
    if args.loop:
        prob = problem(args.loop)
        for _ in range(200):
            call(prob, False)
        raise SystemExit
    print(f"threads {args.threads}; T={T} B={B} H={H} fp32; median of 11 (ms), GFLOP/s")
    for k in (1, 4, 16):
        prob, flop = problem(k), 2 * T * B * H * 4 * (H // k)
        times = {}
        for _ in range(11):  # the cases round-robin
            for fused in ("1", "0"):
                for save in (False, True):
                    os.environ["GRNN_CPU_FUSED"] = fused
                    t0 = time.perf_counter()
                    call(prob, save)
                    times.setdefault((fused, save), []).append(time.perf_counter() - t0)
        cells = []
        for (fused, save), ts in times.items():
            ms = statistics.median(ts) * 1e3
            cells.append(f"{'fused' if fused == '1' else '2pass'} save={int(save)} "
                         f"{ms:6.1f} ms {flop / ms / 1e6:5.1f}")
        print(f"K={k:<3}", " | ".join(cells))
