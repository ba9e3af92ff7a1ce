"""Ad-hoc GPU probe (the exact script behind probe.txt): wall time vs the GPU kernel time
and kernel count per forward+backward of one layer (torch.profiler), and cuDNN's wall time.
Run from the repository root on a GPU machine: python3 results/gpu_h100/probe.py"""
import time, torch, triton, triton.language as tl
from grnn_fairseq.recurrent import RecurrentStack
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))

from torch.profiler import profile, ProfilerActivity
T, B, H = 50, 64, 1024
for k, rearr in ((1, "none"), (4, "time"), (16, "time")):
    stack = RecurrentStack(H, H, 1, "lstm", groups=k, rearrangement=rearr, backend="triton").cuda().bfloat16()
    xi = torch.randn(T, B, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(T, B, H, device="cuda", dtype=torch.bfloat16)
    def it():
        stack(xi)[0].backward(go)
    for _ in range(3): it()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(10): it()
    t_cpu = (time.perf_counter() - t0) / 10; torch.cuda.synchronize(); t_all = (time.perf_counter() - t0) / 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5): it()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ev) / 5 / 1e3
    n = sum(e.count for e in ev if e.self_device_time_total > 0) / 5
    print(f"K={k} {rearr}: wall {t_all*1e3:.2f} ms/iter (CPU enqueue {t_cpu*1e3:.2f}), GPU kernel time {gpu:.2f} ms, kernels {n:.0f}")
    print(ev.table(sort_by="self_cuda_time_total", row_limit=8))
ref = torch.nn.LSTM(H, H).cuda().bfloat16()
xi = torch.randn(T, B, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
def it():
    ref(xi)[0].backward(go)
for _ in range(3): it()
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(10): it()
torch.cuda.synchronize(); print(f"cudnn wall {(time.perf_counter()-t0)/10*1e3:.2f} ms/iter")
