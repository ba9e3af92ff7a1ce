"""In-process A/B of whole fairseq training steps (forward, backward, Adam) on the Debian
De-En corpus: session 29's change (the C++ backward writes the gate gradients transposed
as well, step by step, and the weight gradients dW = dG^T x are products of plain matrices,
``onednn.weight_grad_t``) against the code before it (``onednn.weight_grad`` of the
untransposed gate gradients: oneDNN's weight-gradient op with its operands copied into
oneDNN's layout, or x_k^T dG through the forward op), rebuilt here and swapped in per
step.  Each pass visits the same 30 real batches (at most 1,000 tokens) after 5 warm-up
steps; per batch the variants run in turn (the order alternating), so the drifts of a
shared machine hit all alike.  Or the issue's layer alone (T=50 B=32 H=1024, time
shuffle, K=4 and 16, training) the same way, 15 iterations per variant and pass, medians.

  PYTHONPATH=. python results/cpu_transposed_gates_e2e_ab.py ARCH [PASSES]
  (ARCH "layer": the layer only, "layer:gru" / "layer:rnn" as a GRU / Elman RNN;
  "products": the weight gradients' products alone and the C++ backward with and without
  the transposes)"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grnn_fairseq import engine  # noqa: E402
from grnn_fairseq.kernels import cpu_rnn, onednn  # noqa: E402


def old_cpp_backward(ctx, weight_hh, hs, weight_grad, d_out, d_h, d_c, input_t=False):
    """engine._cpp_backward before: the gate gradients untransposed; dW_hh by
    onednn.weight_grad (input_t ignored: old_projected_backward needs no transposes)."""
    h_in = hs.narrow(0, 2 if ctx.reverse else 0, ctx.fac.shape[1]).flatten(0, 1)
    by_onednn = weight_grad and onednn.wanted(h_in, weight_hh)
    d_gx, d_h0, d_c0, d_w, d_b = cpu_rnn.load().backward(
        ctx.fac, hs, weight_hh, ctx.mask, d_out, d_h, d_c, ctx.time_shuffle, ctx.reverse,
        cpu_rnn.CELL_IDS[ctx.cell], weight_grad and not by_onednn)
    if by_onednn:
        d_w = onednn.weight_grad(d_w, h_in)
    elif not weight_grad:
        d_w = None
    return d_gx, d_w, d_b, ((d_h0, d_c0) if ctx.cell == "lstm" else (d_h0,)), None


@torch.autograd.function.once_differentiable
def old_projected_backward(ctx, d_out, d_h, d_c=None):
    """CppProjectedScan.backward before: dW_ih by onednn.weight_grad of d_gx."""
    flat, weight_ih, weight_hh, hs = ctx.saved_tensors
    need = ctx.needs_input_grad
    gru = ctx.cell == "gru"
    d_gx, d_w_hh, d_b_hh, d_state, _ = old_cpp_backward(ctx, weight_hh, hs, need[4], d_out,
                                                        d_h, d_c)
    d = d_gx.transpose(0, 1).flatten(1, 2)
    d_x = d_w_ih = d_b_ih = None
    if need[1]:
        d_x = onednn.input_grad(d, weight_ih).view(ctx.x_shape)
    if need[2]:
        d_w_ih = onednn.weight_grad(d, flat, need[3] and gru)
        if need[3] and gru:
            d_w_ih, d_b_ih = d_w_ih
    if need[3] and d_b_ih is None:
        d_b_ih = d.sum(1) if gru else d_b_hh
    return ((None, d_x, d_w_ih, d_b_ih, d_w_hh, d_b_hh, None, None, None) + tuple(d_state))


NEW = (engine._cpp_backward, engine.CppProjectedScan.backward)
VARIANTS = {"new": NEW, "old": (old_cpp_backward, staticmethod(old_projected_backward))}


def use(name):
    engine._cpp_backward, backward = VARIANTS[name]
    engine.CppProjectedScan.backward = backward


def fairseq_steps(arch, passes):
    from debian_training_setup import training_setup, training_step

    task, model, opt, batches = training_setup(arch, [], 35)
    for b in batches[:5]:
        training_step(task, model, opt, b)
    for p in range(passes):
        seconds, tokens = dict.fromkeys(VARIANTS, 0.0), 0
        for i, b in enumerate(batches[5:]):
            for name in list(VARIANTS)[::1 if i % 2 == 0 else -1]:
                use(name)
                seconds[name] += training_step(task, model, opt, b)
            tokens += b["ntokens"]
        print(f"{arch} pass {p}: "
              + "  ".join(f"{n} {tokens / seconds[n]:.0f} tok/s" for n in VARIANTS), flush=True)


def layer(passes, cell="lstm"):
    from grnn_fairseq.recurrent import RecurrentStack

    for k in (4, 16):
        torch.manual_seed(0)
        stack = RecurrentStack(1024, 1024, 1, cell, groups=k, rearrangement="time",
                               backend="cpp")
        x = torch.randn(50, 32, 1024, requires_grad=True)
        up = torch.randn(50, 32, 1024)
        for p in range(passes):
            times = {n: [] for n in VARIANTS}
            for i in range(16):
                for name in list(VARIANTS)[::1 if i % 2 == 0 else -1]:
                    use(name)
                    start = time.perf_counter()
                    stack(x)[0].backward(up)
                    if i:  # the first: warm-up
                        times[name].append(time.perf_counter() - start)
            print(f"{cell} layer K={k} pass {p}: " + "  ".join(
                f"{n} {statistics.median(t) * 1e3:.2f} ms" for n, t in times.items()),
                flush=True)


def products(passes):
    """The pieces: onednn.weight_grad of the untransposed gate gradients against
    weight_grad_t of the transposed ones (N = 1600, H = 1024, LSTM gates), and the C++
    backward of the issue's layer with and without the transposes, in turn, medians."""
    for p in range(passes):
        line = []
        for k in (1, 4, 16):
            i, o, n = 1024 // k, 4096 // k, 1600
            g = torch.Generator().manual_seed(0)
            d, x = torch.randn(k, n, o, generator=g), torch.randn(n, k * i, generator=g)
            d_t = d.transpose(1, 2).contiguous()
            line.append(f"K={k} " + "  ".join(f"{name} {ms:.2f}" for name, ms in _timed({
                "weight_grad": lambda: onednn.weight_grad(d, x),
                "weight_grad_t": lambda: onednn.weight_grad_t(d_t, x)}).items()))
        print(f"products pass {p} (ms per dW of all groups): " + "; ".join(line), flush=True)
    ops = cpu_rnn.load()
    for k in (4, 16):
        g = torch.Generator().manual_seed(0)
        m, t_len, b = 1024 // k, 50, 32
        gx = torch.randn(t_len, k, b, 4 * m, generator=g)
        h0 = torch.zeros(k, b, m)
        w, bias = torch.randn(k, 4 * m, m, generator=g) * 0.05, torch.zeros(k, 4 * m)
        _, _, _, fac, hs = ops.forward([gx], h0, h0, w, bias, None, True, False, True, 0)
        d_out = torch.randn(t_len, b, k * m, generator=g)
        for p in range(passes):
            print(f"C++ backward K={k} pass {p} (ms): " + "  ".join(
                f"{name} {ms:.2f}" for name, ms in _timed({
                    "plain": lambda: ops.backward(fac, hs, w, None, d_out, None, None, True,
                                                  False, 0, False, False),
                    "transposed": lambda: ops.backward(fac, hs, w, None, d_out, None, None,
                                                       True, False, 0, False, True)}).items()),
                flush=True)


def _timed(cases, reps=21):
    times = {name: [] for name in cases}
    for i in range(reps + 1):
        for name in list(cases)[::1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            cases[name]()
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


if __name__ == "__main__":
    which, passes = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(f"command: PYTHONPATH=. python results/cpu_transposed_gates_e2e_ab.py {which} "
          f"{passes}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if which.startswith("layer"):
        layer(passes, which.partition(":")[2] or "lstm")
    elif which == "products":
        products(passes)
    else:
        fairseq_steps(which, passes)
