#!/usr/bin/env python
"""Registers, spills and shared memory of the Triton LSTM scans, compiled ahead of time for
a CUDA target without a GPU (Triton's bundled ptxas and cuobjdump).

The persistent scans run one program per SM, so occupancy does not matter, but a kernel
that spills registers to local memory puts a memory round trip into every time step.
This shows what a kernel change costs in registers before a GPU session times it: the
default variant and the A/B variants of VARIANT in grnn_fairseq/kernels/triton_rnn.py
(polling the barrier by loads; the forward's resident W_hh; W_hh's columns permuted for
the time shuffle), at the block sizes the kernels
use for the issue's benchmark (bf16, B=64, H=1024: tiles of 32 x 16; training, no padding).

  python scripts/kernel_resources.py                    # sm_90 (H100), bf16, K=4 and 16
  python scripts/kernel_resources.py --dtype fp32 --groups 1,4,16 --width 1024
"""
import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # the interpreter would replace the kernels
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

VARIANTS = {"default": {}, "load": dict(POLL="load"), "resident": dict(RESIDENT=True),
            "perm": dict(SHUFFLE=2)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--width", type=int, default=1024, help="hidden width H")
    p.add_argument("--groups", default="4,16", help="comma-separated K values")
    args = p.parse_args(argv)
    try:
        args.groups = [int(k) for k in args.groups.split(",")]
    except ValueError:
        p.error(f"--groups {args.groups}: expected comma-separated integers, e.g. 4,16")
    for k in args.groups:
        if k < 1 or args.width % k:
            p.error(f"--groups {k}: the number of groups must divide --width {args.width}")
    return args


def resources(compiled, cuobjdump):
    """-> (registers, spill bytes, shared memory bytes) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = dict(item.split(":") for line in out.splitlines() if "REG:" in line
                 for item in line.split())
    return int(usage["REG"]), int(usage["STACK"]), compiled.metadata.shared


def main(argv=None):
    args = parse_args(argv)
    import triton

    from grnn_fairseq.kernels import triton_rnn

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    if not os.path.exists(cuobjdump):
        sys.exit(f"kernel_resources.py: error: Triton's cuobjdump is not at {cuobjdump}; "
                 "this needs Triton's CUDA backend (pip install triton on Linux x86-64)")
    print(f"sm_{args.arch}, {args.dtype}, H={args.width}, tiles of 32 x 16 (batch x units), "
          f"4 warps; triton {triton.__version__}")
    print(f"{'kernel':<9} {'K':>3} {'m':>5} {'variant':<9} {'registers':>9} {'spill B':>8} "
          f"{'shared B':>9}")
    for k in args.groups:
        m = args.width // k
        fwd, bwd, _ = triton_rnn.kernel_signatures(args.dtype, k, m, block_j=16)
        for name, (fn, ptrs, consts) in (("forward", fwd), ("backward", bwd)):
            for variant, change in VARIANTS.items():
                if variant == "resident" and name == "backward":
                    continue
                if variant == "resident" and not triton_rnn._resident(
                        "lstm", m, 16, 4 if args.dtype == "fp32" else 2, n_tiles=1, n_prog=1,
                        t_len=50):
                    print(f"{name:<9} {k:>3} {m:>5} {variant:<9} (does not fit: "
                          "m not a power of two or slices over _RESIDENT_BYTES)")
                    continue
                # each variant changes the default alone (a fresh dict, never the last one's)
                these = dict(consts, CELL="lstm", HAS_MASK=False, REVERSE=False, **change)
                if variant == "resident":
                    these["BLOCK_R"] = m
                compiled = triton_rnn.compile_kernel(fn, ptrs, these, args.arch)
                regs, spill, shared = resources(compiled, cuobjdump)
                print(f"{name:<9} {k:>3} {m:>5} {variant:<9} {regs:>9} {spill:>8} {shared:>9}")


if __name__ == "__main__":
    main()
