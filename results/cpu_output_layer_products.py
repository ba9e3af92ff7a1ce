"""The output layer's three products on the CPU, MKL (PyTorch's ``addmm`` / ``mm``) against
oneDNN (``mkldnn::_linear_pointwise``) in one process: forward y = x W^T + b, input
gradient dx = dy W, weight gradient dW = dy^T x (oneDNN with x^T as a view and as a
contiguous copy), for N rows of I features and O outputs: the IWSLT-sized model's tied
output projection (I = 128, O = the Debian dictionary's 8,096) at N = 988 and 320, and
I = 256 and 1,000.  Medians of 15 after 3 warm-up calls, ms (GFLOP/s).
  OMP_NUM_THREADS=2 python results/cpu_output_layer_products.py"""
import torch

from cpu_gemm_products import median_ms  # results/ is the script's folder


def main():
    torch.manual_seed(0)
    lin = torch.ops.mkldnn._linear_pointwise
    for n, i, o in [(988, 128, 8096), (320, 128, 8096), (988, 256, 8096), (988, 1000, 8096)]:
        x, w, b, d = torch.randn(n, i), torch.randn(o, i) * 0.1, torch.randn(o), torch.randn(n, o)
        xt = x.t().contiguous()
        gflop = 2 * n * i * o / 1e9
        times = {
            "fwd mkl": median_ms(lambda: torch.addmm(b, x, w.t())),
            "fwd dnn": median_ms(lambda: lin(x, w, b, "none", [], "")),
            "dx mkl": median_ms(lambda: d.mm(w)),
            "dx dnn": median_ms(lambda: lin(d, w.t(), None, "none", [], "")),
            "dw mkl": median_ms(lambda: d.t().mm(x)),
            "dw dnn": median_ms(lambda: lin(d.t(), x.t(), None, "none", [], "")),
            "dw dnn xt": median_ms(lambda: lin(d.t(), xt, None, "none", [], "")),
        }
        print(f"N={n} I={i} O={o}: " + ", ".join(
            f"{k} {v:.2f} ({gflop / v * 1e3:.0f})" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
