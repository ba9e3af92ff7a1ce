"""Counting kernel launches and timing host work without a GPU.

Launches (results/gpu_h100/step_launches.py, decode_launches.py): the model runs on the CPU with the CUDA code path (GRNN_BACKEND=triton,
the Triton kernels in Triton's interpreter), every operator that reaches the dispatcher is
recorded, and each Triton kernel launch counts as one operator (the interpreter's own work
is not recorded).  Launches = operators that run a kernel on a GPU; views, allocations and
other metadata operators (``NO_KERNEL``) are not launches.

Host time (decode_host_time.py): :func:`cuda_path` sends the layers to
the Triton engine's host code on CPU tensors, and :func:`no_launches` makes its launches
no-ops, so what is timed is what the host spends around them.
"""
import collections
import contextlib

from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from grnn_fairseq import engine
from grnn_fairseq.kernels import triton_attention, triton_rnn

# operators that run no kernel on a GPU (views, allocations, metadata)
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "unsqueeze", "squeeze",
             "select", "slice", "split", "split_with_sizes", "unbind", "chunk", "expand",
             "detach", "alias", "as_strided", "empty", "empty_like", "new_empty",
             "new_empty_strided", "empty_strided", "unsafe_split", "_reshape_alias",
             "lift_fresh", "promote_types", "is_same_size"}
KERNELS = ((triton_rnn, ("_decode_step", "_step_bwd", "_scan_fwd", "_scan_bwd")),
           (triton_attention, ("_attention_fwd", "_attention_bwd")))


class Recorder(TorchDispatchMode):
    """Counts the operators dispatched while it is on, by name, in ``ops``."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class CountedKernel:
    """A Triton kernel whose launches count as one operator each, run outside the
    recorder (the interpreter's numpy work is not a launch)."""

    def __init__(self, name, kernel, recorder):
        self.name, self.kernel, self.recorder = name, kernel, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.recorder[0] is not None:
                self.recorder[0].ops["triton:" + self.name] += 1
            with _disable_current_modes():
                return self.kernel[grid](*args, **kwargs)
        return launch


def launches(ops):
    """The launches among counted operators."""
    return sum(v for k, v in ops.items() if k not in NO_KERNEL)


def count_triton_kernels(current):
    """Replace the Triton kernels (``KERNELS``) with :class:`CountedKernel`s that count
    into ``current[0]`` (a Recorder, or None: not counted)."""
    for module, names in KERNELS:
        for name in names:
            setattr(module, name, CountedKernel(name, getattr(module, name), current))


class NoLaunch:
    """A Triton kernel whose launches do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def no_launches():
    """Make every Triton kernel (``KERNELS``) a no-op."""
    for module, names in KERNELS:
        for name in names:
            setattr(module, name, NoLaunch())


_ENGINE = (engine.resolve_backend, engine._interpreting)


@contextlib.contextmanager
def cuda_path(on=True):
    """With ``on``, layer steps take the Triton engine's host path on CPU tensors, as on a
    GPU (scans do not: run encoders outside); without, the engine as it is."""
    saved = (engine.resolve_backend, engine._interpreting)
    if on:
        engine.resolve_backend = lambda *args, **kwargs: "triton"
        engine._interpreting = lambda: True  # let fused_step take CPU tensors
    else:
        engine.resolve_backend, engine._interpreting = _ENGINE
    try:
        yield
    finally:
        engine.resolve_backend, engine._interpreting = saved


def round_robin(cases, rounds):
    """Run each call of ``cases`` once untimed, then ``rounds`` times, every case once per
    round (so that the machine's drifts hit all alike) -> per case the list of what its
    calls returned."""
    for run in cases:
        run()  # warm-up
    times = [[] for _ in cases]
    for _ in range(rounds):
        for run, ts in zip(cases, times):
            ts.append(run())
    return times
