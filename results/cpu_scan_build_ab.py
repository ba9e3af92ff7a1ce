"""The C++ scan alone (no projection: gx given), forward (inference) and forward + backward
(training, with dW_hh), of the issue's layer sizes (T=50 B=32 H=1024, time shuffle,
fp32, K = 1, 4, 16), for A/Bs of build flags of the C++ library: the flags in $XFLAGS are
appended to ``cpu_rnn.CFLAGS`` before the library loads (a build per set of flags, cached
by torch under its own name), so alternating runs compare two builds of the same source,
e.g. the forward's prefetch against ``-DGRNN_NO_PREFETCH``.  Medians of 15 after 3
warm-up calls; GFLOP/s counts the recurrent product only.  $TBH=T,B,H sets the sizes.

  for f in -DGRNN_NO_PREFETCH ""; do XFLAGS="$f" OMP_NUM_THREADS=2 PYTHONPATH=. \\
      python results/cpu_scan_build_ab.py [gru]; done"""
import os
import sys

import torch

from grnn_fairseq import engine
from grnn_fairseq.kernels import cpu_rnn

from cpu_gemm_products import median_ms  # noqa: E402  (results/ is the script's folder)

cpu_rnn.CFLAGS += os.environ.get("XFLAGS", "").split()


def main():
    torch.manual_seed(0)
    t_len, b, h = (int(v) for v in os.environ.get("TBH", "50,32,1024").split(","))
    cells = [("lstm", 4)] + ([("gru", 3)] if "gru" in sys.argv[1:] else [])
    print(f"XFLAGS={os.environ.get('XFLAGS', '')!r}; T={t_len} B={b} H={h}; "
          f"{torch.get_num_threads()} threads")
    for cell, gates in cells:
        for k in (1, 4, 16):
            m = h // k
            gx = torch.randn(t_len, k, b, gates * m) * 0.1
            w = torch.randn(k, gates * m, m) * 0.05
            bias = torch.randn(k, gates * m) * 0.1
            state = tuple(torch.zeros(k, b, m) for _ in range(2 if cell == "lstm" else 1))
            ms = median_ms(lambda: engine.scan_cpp(cell, gx, state, w, bias, None, True))
            w_grad = w.clone().requires_grad_()

            def train():
                out, _ = engine.scan_cpp(cell, gx, state, w_grad, bias, None, True)
                out.sum().backward()
            ms_train = median_ms(train)
            gflops = 2 * t_len * b * gates * m * m * k / ms / 1e6
            print(f"{cell} K={k:2d}: fwd {ms:6.2f} ms ({gflops:5.0f} GFLOP/s)  "
                  f"fwd+bwd {ms_train:6.2f} ms", flush=True)


if __name__ == "__main__":
    main()
