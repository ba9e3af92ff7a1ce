"""The global-memory access instructions of the LSTM scans compiled for sm_90 (no GPU
needed), per time-step shuffle variant: SHUFFLE 0 none, 1 today's shuffle, 2 the permuted
W_hh columns (GRNN_TRITON_PERM=1).  Counts of instruction kinds in the PTX; the same kinds
and counts in every variant mean that only the addresses differ (results/gpu_h100/README.md,
"Prepared 2026-12-06").  From the repository root:

    python results/gpu_h100/ptx_accesses.py
"""
import collections
import os
import re

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from grnn_fairseq.kernels import triton_rnn  # noqa: E402

ACCESS = re.compile(r"\b(ld\.global[.\w]*|st\.global[.\w]*|cp\.async\.\w+\.shared\.global)"
                    r"(?: \[[^\]]*\], \[[^\]]*\], (0x\d+))?")
for k in (4, 16):
    fwd, bwd, _ = triton_rnn.kernel_signatures("bf16", k, 1024 // k, block_j=16)
    for name, (fn, ptrs, consts) in (("forward", fwd), ("backward", bwd)):
        for shuffle in (0, 1, 2):
            compiled = triton_rnn.compile_kernel(
                fn, ptrs, dict(consts, CELL="lstm", SHUFFLE=shuffle, HAS_MASK=False))
            kinds = collections.Counter(
                op + (f" ({int(size, 16)} B)" if size else "")
                for op, size in ACCESS.findall(compiled.asm["ptx"]))
            print(f"K={k:<2} {name:<8} SHUFFLE {shuffle}: "
                  + ", ".join(f"{op} x{n}" for op, n in sorted(kinds.items())))
