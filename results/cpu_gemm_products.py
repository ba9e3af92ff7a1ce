"""The recurrent layer's large fp32 products on the CPU by MKL (PyTorch's ``baddbmm`` /
``bmm``, as ``GRNN_CPU_GEMM=blas`` computes them) and by oneDNN (``_linear_pointwise``
per group and ``onednn.weight_grad_t``, as ``GRNN_CPU_GEMM=onednn`` does), side by side
in one process: the input projection (with its bias), the input gradient and the weight
gradient of every group, H=1024 at K=1, 4 and 16, for the issue's 1,600 rows (T=50 x
B=32) and for 640.  Medians of 15 after 3 warm-up calls, in ms.  It decides what
``GRNN_CPU_GEMM=auto`` should pick on a CPU (``grnn_fairseq/kernels/onednn.py``).

  OMP_NUM_THREADS=2 PYTHONPATH=. python results/cpu_gemm_products.py"""
import statistics
import time

import torch

from grnn_fairseq.kernels import onednn


def median_ms(f, reps=15):
    for _ in range(3):
        f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    torch.manual_seed(0)
    lin = torch.ops.mkldnn._linear_pointwise
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU vendor "
          f"{onednn.cpu_vendor() or '?'}, oneDNN usable: {not onednn.unavailable()}")
    print("K   rows  | projection MKL oneDNN | input grad MKL oneDNN | weight grad MKL oneDNN")
    for k in (1, 4, 16):
        for n in (1600, 640):
            h = 1024
            m = h // k
            x, w, b = torch.randn(n, h), torch.randn(k, 4 * m, m), torch.randn(k, 4 * m)
            parts = [x[:, i * m:(i + 1) * m] for i in range(k)]
            d = torch.randn(k, n, 4 * m)
            d_t = d.transpose(1, 2).contiguous()
            xs = x.view(n, k, m).transpose(0, 1)
            times = (
                median_ms(lambda: torch.baddbmm(b.unsqueeze(1), xs, w.transpose(1, 2))),
                median_ms(lambda: [lin(parts[i], w[i], b[i], "none", [], "")
                                   for i in range(k)]),
                median_ms(lambda: torch.bmm(d, w)),
                median_ms(lambda: [lin(d[i], w[i].t(), None, "none", [], "")
                                   for i in range(k)]),
                median_ms(lambda: torch.bmm(d_t, xs)),
                median_ms(lambda: onednn.weight_grad_t(d_t, x, False)),
            )
            print(f"{k:<3} {n:<5} | {times[0]:14.2f} {times[1]:6.2f} | {times[2]:14.2f} "
                  f"{times[3]:6.2f} | {times[4]:15.2f} {times[5]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
