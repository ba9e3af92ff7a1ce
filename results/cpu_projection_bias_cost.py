"""What adding the input bias costs the recurrent layer's input projection by PyTorch's
products (MKL): torch.bmm against torch.baddbmm with the bias, the products of the issue's
layer (T*B = 1,600 rows, H = 1,024; the GRU's 3 gates, K = 4 and 16), and the bias
gradient's sum over the rows.  On the Intel Xeon of session 30 the bias pass took 5.5 ms of
a 35 ms LSTM forward, so the LSTM's and RNN's input bias moved into the C++ loop; this
asks whether the GRU's (whose candidate bias would need its own vector in the loop) is
worth the same.
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 PYTHONPATH=. python results/cpu_projection_bias_cost.py"""
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_gemm_products import median_ms as median_of  # noqa: E402

median_ms = partial(median_of, reps=30)


def main(rounds=2):
    torch.manual_seed(0)
    for k in (4, 16):
        n, width, gm = 1600, 1024, 3 * 1024 // k
        x, w = torch.randn(k, n, width // k), torch.randn(k, gm, width // k)
        b, g = torch.randn(k, gm), torch.randn(k, n, gm)
        for r in range(rounds):
            plain = median_ms(lambda: torch.bmm(x, w.transpose(1, 2)))
            biased = median_ms(lambda: torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)))
            grad = median_ms(lambda: g.sum(1))
            print(f"K={k} round {r + 1}: bmm {plain:.2f} ms, baddbmm {biased:.2f} ms "
                  f"(bias {biased - plain:+.2f} ms), bias gradient sum {grad:.2f} ms")


if __name__ == "__main__":
    main()
