"""A/B of RNNSearch's attention in one beam-search step on the CPU (no autograd, 5 rows
per source): PyTorch's ops (``GRNN_CPU_ATTENTION=0``) against the fused C++ pass (the
default), alternating, median of 50 calls each.  IWSLT sizes (attention and query 256,
values 512 = the bidirectional encoder's 2 x 256) and WMT sizes (1,000 and 2,000).

    OMP_NUM_THREADS=2 python results/cpu_fused_attention_decode.py
"""
import statistics
import time

import torch

from grnn_fairseq.attention import AdditiveAttention
from grnn_fairseq.kernels import cpu_attention

torch.manual_seed(0)
for name, width, sources, length in (("IWSLT", 256, 64, 30), ("WMT", 1000, 64, 30)):
    att = AdditiveAttention(width, 2 * width, width).eval()
    values = torch.randn(length, sources, 2 * width)
    keys = att.keys(values)
    query = torch.randn(sources * 5, width)
    times = {"0": [], "1": []}
    with torch.no_grad():
        outputs = {}
        for i in range(55):
            for flag in (("0", "1") if i % 2 else ("1", "0")):
                cpu_attention.VARIANT["attention"] = flag
                t = time.perf_counter()
                outputs[flag] = att(query, keys, values, None, 5)
                if i >= 5:
                    times[flag].append(time.perf_counter() - t)
    diff = (outputs["0"][0] - outputs["1"][0]).abs().max().item()
    ops, fused = (statistics.median(times[f]) for f in ("0", "1"))
    print(f"{name}: {sources} sources x beam 5, {length} source tokens: torch ops "
          f"{ops * 1e3:.3f} ms, fused {fused * 1e3:.3f} ms, {ops / fused:.2f}x; "
          f"largest context difference {diff:.1e}")
