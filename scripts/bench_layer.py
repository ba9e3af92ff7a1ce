#!/usr/bin/env python
"""Layer-level benchmark: group LSTM (RecurrentStack) against torch.nn.LSTM / LSTMCell;
with --cell gru / rnn the GRU / Elman RNN against torch.nn.GRU / GRUCell, RNN / RNNCell.

Every case of a mode is timed side by side in one run: the repetitions visit the cases
round-robin (so slow drifts of a shared machine hit all of them alike) and the table
gives the median time per call and its ratio to torch.nn of the same width.  Under each
table, what the time-step shuffle costs every case run with both --rearrangement values.

Modes:
  train   forward + backward of one layer over [T, B, H] (input gradient included)
  infer   forward without autograd
  decode  --decode-steps single steps at batch --decode-batch without autograd
          (RecurrentStack.step vs torch.nn.LSTMCell), the input projection included;
          --graph (CUDA): each case also replayed from a CUDA graph
  steps   T single steps of one layer at batch B with autograd, then the backward: a
          decoder trained step by step, as RNNSearch's (input feeding and attention
          prevent a scan); RecurrentStack.step vs torch.nn.LSTMCell, which is what
          fairseq's own LSTM decoder runs (cuDNN's fused cell on the GPU).  Compare
          triton with triton+trainstep (the LSTM's fused training step) on a GPU

Defaults follow the issue: CPU fp32 T=50 B=32 H=1024; CUDA bf16 T=50 B=64 H=1024.

  python scripts/bench_layer.py                                  # CPU, auto backend
  python scripts/bench_layer.py --backend reference,torch        # before / after
  python scripts/bench_layer.py --backend cpp-2pass,cpp           # fused C++ step on / off
  python scripts/bench_layer.py --backend cpp+avx2,cpp+avx512     # its tiles (AVX-512 CPU)
  python scripts/bench_layer.py --backend cpp-blas,cpp-onednn      # products: MKL / oneDNN
  python scripts/bench_layer.py --device cuda --backend triton,torch
  python scripts/bench_layer.py --device cuda --cell gru --backend triton,reference
  python scripts/bench_layer.py --device cuda --backend triton,triton+load,triton+resident,triton+perm
  python scripts/bench_layer.py --device cuda --modes steps --backend triton,triton+trainstep
  python scripts/bench_layer.py --device cuda --modes decode --graph --backend triton
  python scripts/bench_layer.py --quick                          # smoke test
"""
import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from grnn_fairseq.recurrent import RecurrentStack

NN = {"lstm": (torch.nn.LSTM, torch.nn.LSTMCell, "LSTM"),
      "gru": (torch.nn.GRU, torch.nn.GRUCell, "GRU"),
      "rnn": (torch.nn.RNN, torch.nn.RNNCell, "RNN")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


MODES = ("train", "infer", "decode", "steps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--cell", default="lstm", choices=tuple(NN),
                   help="recurrent cell; compared with torch.nn's layer and cell of that type")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--T", type=int, default=50, help="sequence length")
    p.add_argument("--B", type=int, help="batch size (default: 32 on cpu, 64 on cuda)")
    p.add_argument("--H", type=int, default=1024, help="input and hidden width")
    p.add_argument("--groups", default="1,2,4,8,16", help="comma-separated K values")
    p.add_argument("--rearrangement", default="none,time",
                   help="comma-separated modes (none|time|both|layer)")
    p.add_argument("--backend", default="auto",
                   help="comma-separated engine backends (auto|reference|torch|cpp|triton; "
                        "cpp-2pass: cpp without its fused fp32 step, GRNN_CPU_FUSED=0; "
                        "NAME-blas (e.g. cpp-blas, cpp-2pass-blas): the layers' large products "
                        "by PyTorch's (MKL), GRNN_CPU_GEMM=blas; NAME-onednn: by oneDNN, "
                        "GRNN_CPU_GEMM=onednn (plain NAME: auto, oneDNN only on non-Intel "
                        "x86 CPUs with AVX-512); "
                        "cpp+avx2, cpp+generic, cpp+avx512: cpp with that vector unit's "
                        "tile of the fused step, GRNN_CPU_ISA=...; "
                        "triton+load, triton+resident, triton+perm and their combinations, "
                        "e.g. triton+load+resident: triton with those variants of its "
                        "persistent scans, GRNN_TRITON_POLL=load, GRNN_TRITON_RESIDENT=1, "
                        "GRNN_TRITON_PERM=1; triton+trainstep: the LSTM's fused training "
                        "step, GRNN_TRITON_TRAIN_STEP=1, for mode steps)")
    p.add_argument("--modes", default="train,infer,decode",
                   help="comma-separated modes (train|infer|decode|steps)")
    p.add_argument("--padding", type=float, default=0.0,
                   help="fraction of the batch padded to half length (exercises masks)")
    p.add_argument("--decode-batch", type=int, default=320)
    p.add_argument("--decode-steps", type=int, default=10, help="steps per timed decode call")
    p.add_argument("--graph", action="store_true",
                   help="mode decode, on CUDA: every case (torch.nn's cell too) also as one "
                        "CUDA graph of its --decode-steps steps, recorded once and replayed "
                        "(what GRNN_DECODE_GRAPHS=1 does for a whole decoder step); the "
                        "ratios stay against torch.nn's cell run eagerly")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (cuda events on the GPU); cpu: CPU time of this "
                        "process (CPU only; with --threads 1 it is robust to other load on "
                        "a shared machine, which makes wall times of small ops erratic)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny sizes, 1 repetition (numbers are meaningless)")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.H, args.decode_batch, args.decode_steps = 5, 32, 8, 2
        args.B = args.B or 4
        args.reps = args.reps or 1
        args.warmup = 1 if args.warmup is None else args.warmup
    cuda = args.device == "cuda"
    if args.graph and not cuda:
        p.error("--graph records CUDA graphs: use it with --device cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.B = args.B or (64 if cuda else 32)
    args.reps = args.reps or (20 if cuda else 5)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.groups = [int(k) for k in args.groups.split(",")]
    args.rearrangement = args.rearrangement.split(",")
    args.backend = args.backend.split(",")
    args.modes = args.modes.split(",")
    return args


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:  # the model name, and the family and model numbers (which tell CPU generations
        # apart where the name does not: "AMD EPYC" is Zen 3, 4 or 5)
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        name = f"{info['model name']}, family {info['cpu family']} model {info['model']}"
    except (OSError, KeyError):
        pass
    from grnn_fairseq.kernels import cpu_rnn, onednn

    unit = cpu_rnn.fused_step_unit()
    return (f"{name} ({torch.get_num_threads()} threads; C++ fused step: "
            f"{unit or 'not built'}; large products: {onednn.library()})")


class Timer:
    """Time one call (ms): cuda events on the GPU; on the CPU perf_counter, or process_time
    with ``cpu=True``."""

    def __init__(self, device, cpu=False):
        self.cuda = device.type == "cuda"
        self.clock = time.process_time if cpu else time.perf_counter

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = self.clock()
        fn()
        return (self.clock() - t0) * 1e3


def make_cases(args, mode, device, dtype):
    """-> list of (label dict, callable) for one mode; the torch.nn case first."""
    T, B, H = args.T, args.B, args.H
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cases = []
    nn_layer, nn_cell, name = NN[args.cell]
    if mode == "decode":
        bd = args.decode_batch
        x = rand(bd, H)
        cell = nn_cell(H, H).to(device=device, dtype=dtype)
        h0 = (rand(bd, H), rand(bd, H)) if args.cell == "lstm" else rand(bd, H)

        def run_cell():
            with torch.no_grad():
                s = h0
                for _ in range(args.decode_steps):
                    s = cell(x, s)
        cases.append((dict(model=f"nn.{name}Cell", K="-", rearr="-", backend="-"), run_cell))

        def run_step(stack, states):
            def run():
                with torch.no_grad():
                    s = states
                    for _ in range(args.decode_steps):
                        _, s = stack.step(x, s)
            return run
        cases += group_cases(args, device, dtype, bd, x, run_step)
        if args.graph:
            cases = [c for label, run in cases for c in (
                (label, run),
                (dict(label, backend="graph" if label["backend"] == "-"
                      else label["backend"] + "+graph"), graphed(run)))]
        return cases

    if mode == "steps":
        xs, grad_steps = rand(T, B, H), rand(T, B, H)
        cell = nn_cell(H, H).to(device=device, dtype=dtype)
        h0 = (rand(B, H), rand(B, H)) if args.cell == "lstm" else rand(B, H)

        def run_cell_steps():
            s, outs = h0, []
            for x_t in xs.detach().requires_grad_():
                s = cell(x_t, s)
                outs.append(s[0] if isinstance(s, tuple) else s)
            torch.stack(outs).backward(grad_steps)
        cases.append((dict(model=f"nn.{name}Cell", K="-", rearr="-", backend="-"),
                      run_cell_steps))

        def run_steps(stack, states):
            def run():
                s, outs = states, []
                weights = stack.step_weights()  # once per sequence, as RNNSearch's decoder
                for x_t in xs.detach().requires_grad_():
                    out, s = stack.step(x_t, s, weights)
                    outs.append(out)
                torch.stack(outs).backward(grad_steps)
            return run
        return cases + group_cases(args, device, dtype, B, xs, run_steps)

    x = rand(T, B, H)
    pad = None
    if args.padding > 0:
        n = max(1, int(round(args.padding * B)))
        pad = torch.zeros(T, B, dtype=torch.bool, device=device)
        pad[T // 2:, :n] = True
    grad_out = rand(T, B, H)
    train = mode == "train"

    def runner(module, is_torch):
        xi = x.detach().requires_grad_(train)

        def run():
            if train:
                out = module(xi)[0] if is_torch else module(xi, padding_mask=pad)[0]
                out.backward(grad_out)
            else:
                with torch.no_grad():
                    module(xi) if is_torch else module(xi, padding_mask=pad)
        return run

    ref = nn_layer(H, H).to(device=device, dtype=dtype)
    cases.append((dict(model=f"nn.{name}", K="-", rearr="-", backend="-"), runner(ref, True)))
    return cases + group_cases(args, device, dtype, B, x,
                               lambda stack, _: runner(stack, False))


def group_cases(args, device, dtype, batch, like, make_run):
    """The group layer's cases, one per K x rearrangement x backend: (label,
    make_run(one-layer RecurrentStack, its zero initial states for ``batch`` rows),
    wrapped for the backend's variant)."""
    cases = []
    for k in args.groups:
        for rearr in args.rearrangement:
            for backend in args.backend:
                engine, wrap = engine_of(backend)
                stack = RecurrentStack(args.H, args.H, 1, args.cell, groups=k,
                                       rearrangement=rearr, backend=engine).to(device, dtype)
                states = [s[0] for s in stack.zero_state(batch, like)]
                cases.append((dict(model=f"group {NN[args.cell][2]}", K=k, rearr=rearr,
                                   backend=backend), wrap(make_run(stack, states))))
    return cases


TRITON_VARIANTS = {"load": ("poll", "load"), "resident": ("resident", "1"),
                   "perm": ("perm", "1"), "trainstep": ("train_step", "1")}


def engine_of(backend):
    """-> (engine backend, wrapper of a timed call): ``NAME-blas`` is NAME with the large
    products by PyTorch's (GRNN_CPU_GEMM=blas), ``NAME-onednn`` by oneDNN
    (GRNN_CPU_GEMM=onednn); ``cpp-2pass`` is ``cpp`` run under
    :func:`two_pass`, ``cpp+avx2`` (``+generic``, ``+avx512``) ``cpp`` with that vector
    unit's tile (GRNN_CPU_ISA); ``triton+load``, ``triton+resident``, ``triton+perm``,
    ``triton+trainstep`` and their combinations (``triton+load+resident``) are ``triton``
    run with those variants
    (:func:`triton_variant`); every other name is the engine itself, unwrapped."""
    for gemm in ("blas", "onednn"):
        if backend.endswith(f"-{gemm}"):
            inner, wrap = engine_of(backend.removesuffix(f"-{gemm}"))
            return inner, lambda run, g=gemm: with_env(wrap(run), {"GRNN_CPU_GEMM": g})
    if backend.endswith("-2pass"):
        return backend.removesuffix("-2pass"), two_pass
    name, *variants = backend.split("+")
    if name == "cpp" and variants:
        from grnn_fairseq.errors import ConfigError
        from grnn_fairseq.kernels import cpu_rnn

        unit = "+".join(variants)
        try:
            cpu_rnn.check_switches({"GRNN_CPU_ISA": unit})
        except ConfigError as e:
            sys.exit(f"bench_layer.py: error: --backend {backend}: {e}")
        return name, lambda run: with_env(run, {"GRNN_CPU_ISA": unit})
    if variants:
        if name != "triton" or not set(variants) <= set(TRITON_VARIANTS):
            sys.exit(f"bench_layer.py: error: --backend {backend}: variants exist for triton "
                     f"(triton+{'|'.join(TRITON_VARIANTS)}, one or more, joined by +) and cpp "
                     f"(cpp+generic|avx2|avx512, one) only")
        return name, lambda run: triton_variant(run, variants)
    return backend, lambda run: run


def triton_variant(run, variants):
    """``triton+load`` etc.: the Triton kernels with VARIANT set for the duration of a call
    (what GRNN_TRITON_POLL / GRNN_TRITON_RESIDENT / GRNN_TRITON_PERM /
    GRNN_TRITON_TRAIN_STEP set for a whole process)."""
    from grnn_fairseq.kernels import triton_rnn

    def run_variant():
        old = dict(triton_rnn.VARIANT)
        triton_rnn.VARIANT.update(TRITON_VARIANTS[v] for v in variants)
        try:
            run()
        finally:
            triton_rnn.VARIANT.update(old)
    return run_variant


def graphed(run):
    """``--graph``: ``run`` recorded as a CUDA graph at its first call (after one eager
    warm-up run, by the recorder of GRNN_DECODE_GRAPHS=1), replayed at every call."""
    from grnn_fairseq.decode_graphs import CudaRecorder

    replay = []

    def run_graph():
        if not replay:
            replay.append(CudaRecorder().record(lambda: (run(),), ())[1])
        replay[0]()
    return run_graph


def with_env(run, values):
    """``run`` with the environment variables ``values`` set for the duration of each call
    (the C++ library reads them at every call)."""
    def run_with_env():
        old = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            run()
        finally:
            for k, v in old.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
    return run_with_env


def two_pass(run):
    """``cpp-2pass``: the cpp backend with its fused fp32 step switched off
    (GRNN_CPU_FUSED=0: one BLAS product per step, then the pointwise pass)."""
    return with_env(run, {"GRNN_CPU_FUSED": "0"})


def bench_mode(args, mode, device, dtype):
    """-> (rows, complete rounds).  An interrupt (Ctrl-C, or the SIGINT of gpu-checks.sh's
    time caps) after at least one complete round ends the timing early: the rows then
    hold the rounds completed so far, every case the same number.  Before that (warm-up,
    where the GPU kernels compile) it propagates."""
    cases = make_cases(args, mode, device, dtype)
    timer = Timer(device, cpu=args.timer == "cpu")
    for _, fn in cases:
        for _ in range(args.warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = [[] for _ in cases]
    done = 0
    try:
        for _ in range(args.reps):
            this_round = [timer(fn) for _, fn in cases]
            for ts, t in zip(times, this_round):
                ts.append(t)
            done += 1
    except KeyboardInterrupt:
        if done == 0:
            raise
    base, base_min = statistics.median(times[0]), min(times[0])
    rows = []
    for (label, _), ts in zip(cases, times):
        med = statistics.median(ts)
        rows.append(dict(label, mode=mode, ms=med, min=min(ts), speedup=base / med,
                         speedup_min=base_min / min(ts)))
    return rows, done


def print_table(rows):
    bw = max([10] + [len(r["backend"]) for r in rows])
    head = (f"{'mode':<7} {'model':<11} {'K':>3} {'rearr':<6} {'backend':<{bw}} {'median ms':>10} "
            f"{'min ms':>9} {'x median':>9} {'x min':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['mode']:<7} {r['model']:<11} {str(r['K']):>3} {r['rearr']:<6} "
              f"{r['backend']:<{bw}} {r['ms']:>10.2f} {r['min']:>9.2f} {r['speedup']:>9.2f} "
              f"{r['speedup_min']:>7.2f}")


def shuffle_costs(rows):
    """What the time-step rearrangement costs each case measured with and without it
    (same mode, model, K and backend): -> [(label, by the median, by the min)], each
    time / none - 1 (issue 5's GPU target: at most +10%)."""
    none = {(r["mode"], r["model"], r["K"], r["backend"]): r for r in rows
            if r["rearr"] == "none"}
    costs = []
    for r in rows:
        key = (r["mode"], r["model"], r["K"], r["backend"])
        if r["rearr"] == "time" and key in none:
            costs.append((f"{r['model']} K={r['K']} {r['backend']}",
                          r["ms"] / none[key]["ms"] - 1, r["min"] / none[key]["min"] - 1))
    return costs


def print_shuffle_costs(rows):
    costs = shuffle_costs(rows)
    if costs:
        print("time-step shuffle's cost (rearr time over none, minus 1; by the median / by "
              "the min):")
        for label, med, low in costs:
            print(f"  {label}: {med:+.1%} / {low:+.1%}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    if device.type == "cuda" and args.timer == "cpu":
        sys.exit("--timer cpu measures CPU work: use it with --device cpu")
    dtype = DTYPES[args.dtype]
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    print(f"device:  {device_name(device)}; torch {torch.__version__}; cell {args.cell}; "
          f"dtype {args.dtype}; T={args.T} B={args.B} H={args.H}; "
          f"decode batch {args.decode_batch} x {args.decode_steps} steps"
          f"{' (also as CUDA graphs)' if args.graph else ''}; padding {args.padding}; reps {args.reps} (median), "
          f"warmup {args.warmup}; timer {args.timer}; "
          f"GRNN_BACKEND={os.environ.get('GRNN_BACKEND', '(unset)')}")
    for mode in args.modes:
        if mode not in MODES:
            sys.exit(f"--modes: unknown mode {mode!r} ({'|'.join(MODES)})")
    rows = []
    for mode in args.modes:    # a table per mode as soon as it is measured
        try:
            mode_rows, done = bench_mode(args, mode, device, dtype)
        except KeyboardInterrupt:
            print(f"stopped by an interrupt during the warm-up of mode {mode} (where the "
                  "kernels compile): nothing of it was timed", flush=True)
            sys.exit(130)
        rows += mode_rows
        print_table(mode_rows)
        print("x median / x min = torch.nn's median / min time (first row of each mode) over "
              "the row's; above 1: faster than torch.nn")
        print_shuffle_costs(mode_rows)
        sys.stdout.flush()
        if done < args.reps:
            print(f"stopped by an interrupt after {done} of {args.reps} repetitions of mode "
                  f"{mode}: the table has the medians of those; later modes were not run",
                  flush=True)
            sys.exit(130)
    return rows


if __name__ == "__main__":
    main()
