"""Kernel launches per beam-search step of fairseq's SequenceGenerator with RNNSearch's
decoder, eager and replayed from CUDA graphs (GRNN_DECODE_GRAPHS=1), counted without a GPU
(launch_count.py: the CUDA code path on the CPU, Triton's interpreter).

On the GPU, beam search is bound by the host: every operator is a launch of a few
microseconds of host time.  With graphs, the decoder's step is the copies of its inputs
into the graph's own tensors and one replay; the graph is played here by the tests'
FakeRecorder (tests/test_decode_graphs.py), whose replay runs the step outside the count
and counts as one launch.  Recording a bucket's graph is a one-off per bucket, counted
apart.  The generator's own work (scores, top-k, finished hypotheses, reorders) is listed
apart: graphs do not change it.

Beam 5, 6 sentences of 3 to 9 source tokens, every hypothesis 10 tokens + EOS (min and max
length 10, as bench_fairseq.sh's --gen-length), WMT14-like depth (4 layers each side) at
width 32 (the sizes do not change the counts).

    python results/gpu_h100/decode_launches.py > results/gpu_h100/decode_launches.txt
"""
import collections
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ["GRNN_BACKEND"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

import torch  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes  # noqa: E402

from launch_count import NO_KERNEL, Recorder, count_triton_kernels, launches  # noqa: E402
from test_decode_graphs import FakeRecorder  # noqa: E402
from test_models import build_mt, source_batch  # noqa: E402

from grnn_fairseq import decode_graphs  # noqa: E402
from grnn_fairseq.kernels import triton_attention  # noqa: E402

WIDE = ["--encoder-layers", "4", "--decoder-layers", "4", "--encoder-embed-dim", "32",
        "--decoder-embed-dim", "32", "--encoder-hidden-size", "32",
        "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32", "--attention-dim", "32"]
LENGTH, BEAM = 10, 5
CURRENT = [None]  # the Recorder that Triton launches count into


class CountedReplays(FakeRecorder):
    """FakeRecorder whose recording and replays run outside the count; a replay counts as
    one launch ('graph replay'), a recording is counted in ``recordings``."""

    def __init__(self):
        super().__init__()
        self.recordings = 0

    def record(self, fn, inputs):
        self.recordings += 1
        saved, CURRENT[0] = CURRENT[0], None
        with _disable_current_modes():
            outputs, replay = super().record(fn, inputs)
        CURRENT[0] = saved

        def counted_replay():
            if CURRENT[0] is not None:
                CURRENT[0].ops["graph replay"] += 1
            saved, CURRENT[0] = CURRENT[0], None
            with _disable_current_modes():
                replay()
            CURRENT[0] = saved
        return outputs, counted_replay


MODES = {"eager": "eager (default)",
         "attention": "eager, GRNN_TRITON_ATTENTION=1",
         "graphs": "CUDA graphs (GRNN_DECODE_GRAPHS=1)"}


def count(cell, groups, mode):
    """-> (decoder ops, generator's other ops, decoder steps, graphs recorded)."""
    graphs = mode == "graphs"
    triton_attention.VARIANT["attention"] = "1" if mode == "attention" else "0"
    torch.manual_seed(0)
    model = build_mt(cell=cell, groups=groups, extra=WIDE).eval()
    _, src, lengths = source_batch((7, 3, 5, 2, 9, 4), seed=5)
    recorder = CountedReplays()
    if graphs:
        os.environ["GRNN_DECODE_GRAPHS"] = "1"
        model.decoder.step_graphs = decode_graphs.StepGraphs(recorder)
    else:
        os.environ["GRNN_DECODE_GRAPHS"] = "0"
    gen = SequenceGenerator([model], model.decoder.dictionary, beam_size=BEAM, max_len_a=0,
                            max_len_b=LENGTH, min_len=LENGTH)
    with torch.no_grad():
        encoder_out = model.encoder(src, lengths)  # not counted: once per batch
    generator, decoder = Recorder(), Recorder()
    steps = [0]
    forward = model.decoder.forward

    def counted_forward(*args, **kwargs):  # the decoder's ops go to their own count
        steps[0] += 1
        with decoder:
            CURRENT[0] = decoder
            out = forward(*args, **kwargs)
        CURRENT[0] = generator
        return out

    model.decoder.forward = counted_forward
    model.encoder.forward = lambda *a, **k: encoder_out
    CURRENT[0] = generator
    with generator:
        gen.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})
    CURRENT[0] = None
    # the decoder's mode sits inside the generator's: its operators reach both counts, its
    # Triton launches and replays (counted by hand, into CURRENT) the decoder's only
    rest = collections.Counter(generator.ops)
    rest.subtract({k: v for k, v in decoder.ops.items()
                   if not k.startswith("triton:") and k != "graph replay"})
    return decoder.ops, rest, steps[0], recorder.recordings


count_triton_kernels(CURRENT)
print(f"per beam-search step of fairseq's SequenceGenerator, RNNSearch (4 decoder layers, "
      f"rearrangement 'both'), beam {BEAM},")
print(f"6 sentences, {LENGTH} tokens + EOS each: operators with a GPU kernel (launches) / all "
      f"operators that reach the dispatcher (host calls)")
print()
print(f"{'cell':<5} {'K':>2} {'decoder step':<34} {'launches':>8} {'calls':>6} "
      f"{'generator launches':>18} {'generator calls':>15} {'graphs':>6}")
detail = []
for cell in ("lstm", "gru"):
    for k in (1, 4):
        for mode, label in MODES.items():
            dec, rest, steps, recorded = count(cell, k, mode)
            graphs = mode == "graphs"
            per = {n: v / steps for n, v in dec.items()}
            print(f"{cell:<5} {k:>2} {label:<34} {launches(per):>8.1f} {sum(per.values()):>6.1f} "
                  f"{launches(rest) / steps:>18.1f} {sum(rest.values()) / steps:>15.1f} "
                  f"{recorded if graphs else '-':>6}", flush=True)
            detail.append((cell, k, label, per))
print()
print("the decoder's launching operators per step, by name:")
for cell, k, label, per in detail:
    names = ", ".join(f"{n} {v:.3g}" for n, v in sorted(per.items(), key=lambda x: -x[1])
                      if n not in NO_KERNEL)
    print(f"  {cell}, K={k}, {label}: {names}")
