"""The dropout op alone on the CPU: torch's ``F.dropout`` (mask from ``bernoulli_``)
against :func:`grnn_fairseq.dropout.seeded_dropout` (Philox masks in C++), and the C++ op
without the Python around it (the seed's draw, the autograd node), float32, forward only,
side by side (the three in turn for each shape, median of 7 rounds of 100 calls).

    OMP_NUM_THREADS=2 python results/cpu_dropout_op.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

from grnn_fairseq.dropout import seeded_dropout
from grnn_fairseq.kernels import cpu_rnn

ops = cpu_rnn.load()
SHAPES = {"a decoder step's [25, 256]": (25, 256), "embeddings [30, 25, 128]": (30, 25, 128),
          "encoder outputs [30, 25, 512]": (30, 25, 512), "[1000, 512]": (1000, 512)}
print(f"{torch.get_num_threads()} threads; microseconds per call (ns per element)")
for name, shape in SHAPES.items():
    x = torch.randn(*shape)
    cases = {"F.dropout": lambda: F.dropout(x, 0.3, True),
             "seeded_dropout": lambda: seeded_dropout(x, 0.3),
             "C++ op alone": lambda: ops.seeded_dropout(x, 0.3, 5)}
    times = {k: [] for k in cases}
    for f in cases.values():
        f()
    for _ in range(7):
        for k, f in cases.items():
            t = time.perf_counter()
            for _ in range(100):
                f()
            times[k].append((time.perf_counter() - t) / 100 * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: " + ", ".join(f"{k} {v:.1f} ({v * 1e3 / x.numel():.2f})" for k, v in med.items())
          + f"; F.dropout / seeded_dropout {med['F.dropout'] / med['seeded_dropout']:.1f}x")
