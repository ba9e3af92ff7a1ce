#!/usr/bin/env python
"""Attention benchmark: RNNSearch's additive attention (grnn_fairseq.attention) over the T
target positions of one batch, in PyTorch ops against the fused Triton kernels
(GRNN_TRITON_ATTENTION=1, kernels/triton_attention.py), timed side by side in one run
(cases visited round-robin; median time per call, ratio = PyTorch's / the case's).

Modes:
  train   T positions with autograd over the same keys and values, their gradients summed
          once per sequence as RNNSearch's decoder does (sequence_keys, sequence_values,
          sequence_projection), then the backward of all of them
  decode  T positions without autograd, --beam rows per source (beam search)

Defaults: WMT14 sizes (query 1000, values 2000 = a bidirectional encoder of 1000, attention
1000), S=50 sources of which a quarter are padded to half length, B=64, T=50; bf16 on CUDA.

  python scripts/bench_attention.py --device cuda
  python scripts/bench_attention.py --quick          # smoke test, Triton's interpreter on CPU
"""
import argparse
import os
import statistics
import sys

if "--quick" in sys.argv and "--device" not in " ".join(sys.argv):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    os.environ.setdefault("GRNN_BACKEND", "triton")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layer import DTYPES, Timer, device_name  # noqa: E402

from grnn_fairseq.attention import AdditiveAttention, fused  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--T", type=int, default=50, help="target positions")
    p.add_argument("--S", type=int, default=50, help="source length")
    p.add_argument("--B", type=int, default=64, help="sources (sentences)")
    p.add_argument("--beam", type=int, default=5, help="rows per source in mode decode")
    p.add_argument("--query", type=int, default=1000)
    p.add_argument("--values", type=int, default=2000)
    p.add_argument("--attention", type=int, default=1000)
    p.add_argument("--modes", default="train,decode", help="comma-separated (train|decode)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny sizes, 1 repetition (numbers are meaningless)")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.S, args.B, args.beam = 3, 5, 2, 2
        args.query, args.values, args.attention = 8, 6, 4
        args.reps = args.reps or 1
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    args.reps = args.reps or 20
    args.modes = args.modes.split(",")
    for mode in args.modes:
        if mode not in ("train", "decode"):
            p.error(f"--modes: {mode!r} is not train or decode")
    return args


def make_run(args, mode, device):
    """-> a callable that runs one mode's T positions (with the current VARIANT)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        t = (torch.randn(*shape, generator=g) * 0.5).to(device, args.dtype)
        return t.requires_grad_(grad)

    att = AdditiveAttention(args.query, args.values, args.attention).to(device, args.dtype)
    train = mode == "train"
    rows = 1 if train else args.beam
    values = rand(args.S, args.B, args.values, grad=train)
    keys = att.keys(values.detach()).detach().requires_grad_(train)
    mask = torch.zeros(args.S, args.B, dtype=torch.bool, device=device)
    mask[:args.S // 2, :args.B // 4] = True  # left padding
    queries = rand(args.T, args.B * rows, args.query, grad=train)
    grad = rand(args.T, args.B * rows, args.values)

    def run():
        with torch.set_grad_enabled(train):
            k, key_grads = att.sequence_keys(keys)
            h, value_grads = att.sequence_values(values)
            projection = att.sequence_projection()
            outs = [att(q, k, h, mask, rows, value_grads, key_grads, projection)[0]
                    for q in queries]
            if train:
                torch.stack(outs).backward(grad)
    return run


def main(argv=None):
    args = parse_args(argv)
    from grnn_fairseq.kernels import triton_attention

    device = torch.device(args.device)
    probe = torch.zeros(1, 1, 1, device=device, dtype=args.dtype)
    triton_attention.VARIANT["attention"] = "1"
    if not fused(probe):
        sys.exit("bench_attention.py: the fused attention does not run here: it needs a CUDA "
                 "device (or --quick, Triton's interpreter) and the triton backend there")
    print(f"# {' '.join(['python'] + sys.argv)}")
    print(f"# device: {device_name(device)}; torch {torch.__version__}; "
          f"{str(args.dtype).replace('torch.', '')}; T={args.T} S={args.S} B={args.B} "
          f"query={args.query} values={args.values} attention={args.attention}")
    timer = Timer(device)
    print(f"{'mode':<7} {'attention':<9} {'median ms':>10} {'ratio':>7}")
    for mode in args.modes:
        run = make_run(args, mode, device)
        times = {"torch": [], "triton": []}
        for rep in range(args.reps + 1):  # the first round is untimed (compilation)
            for case in times:
                triton_attention.VARIANT["attention"] = "1" if case == "triton" else "0"
                t = timer(run)
                if rep:
                    times[case].append(t)
        base = statistics.median(times["torch"])
        for case, ts in times.items():
            med = statistics.median(ts)
            print(f"{mode:<7} {case:<9} {med:>10.3f} {base / med:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
