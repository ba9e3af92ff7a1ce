"""Where the time of whole training steps of ARCH goes on the CPU: torch.profiler over 20
steps on real Debian De-En batches (at most 1,000 tokens; after 5 warm-up steps), first
the operators by self time, then the matrix products by input shape.  Session 31 used it
on the Zen 4 for the IWSLT-sized 4-group model (results/cpu_output_layer_products.txt).
  OMP_NUM_THREADS=2 PYTHONPATH=. python results/cpu_training_profile.py ARCH"""
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from debian_training_setup import training_setup, training_step  # noqa: E402

PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def main(arch, warmup=5, timed=20):
    task, model, opt, batches = training_setup(arch, [], warmup + timed)
    for b in batches[:warmup]:
        training_step(task, model, opt, b)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        seconds = sum(training_step(task, model, opt, b) for b in batches[warmup:])
    tokens = sum(b["ntokens"] for b in batches[warmup:])
    print(f"{arch}: {timed} steps, {seconds:.2f} s, target tok/s {tokens / seconds:.0f}")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    rows = [e for e in p.key_averages(group_by_input_shape=True) if e.key in PRODUCTS]
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    print("products by shape (calls, self ms, input shapes):")
    for e in rows[:12]:
        print(f"  {e.key:14s} {e.count:5d} {e.self_cpu_time_total / 1e3:8.1f} {e.input_shapes}")


if __name__ == "__main__":
    main(sys.argv[1])
