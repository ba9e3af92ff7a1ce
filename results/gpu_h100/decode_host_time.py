"""Host time of fairseq's beam search with RNNSearch's decoder, eager (with PyTorch's or
the fused attention, GRNN_TRITON_ATTENTION=1) and from CUDA graphs (GRNN_DECODE_GRAPHS=1),
measured without a GPU: what a host-bound beam search on the GPU costs the CPU.

The CUDA code path runs on CPU tensors at a tiny width (16), so each operator costs about
its dispatch, as a launch does on the host: the Triton launches are no-ops (as in
host_overhead.py), and a graph's replay is a no-op too (a real replay costs the host a few
microseconds: cudaGraphLaunch); the logits are made finite after each step, outside the
decoder's time, in both modes.  Timed: the decoder's forward of every step, and the whole
beam search (the generator's own work included), per step, over a batch of 6 sentences,
beam 5, 20 tokens each; WMT14-like depth (4 layers each side); 2 threads or fewer do not
change it (one at a time).  From the repository root:

    OMP_NUM_THREADS=1 python results/gpu_h100/decode_host_time.py
"""
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

import torch  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

from test_models import SRC_V, TGT_V, build_mt, make_dict, source_batch  # noqa: E402

from grnn_fairseq import decode_graphs  # noqa: E402
from grnn_fairseq.kernels import triton_attention  # noqa: E402
from launch_count import cuda_path, no_launches, round_robin  # noqa: E402

LENGTH, BEAM, ROUNDS = 20, 5, 15
WIDE = ["--encoder-layers", "4", "--decoder-layers", "4"]


class NoReplay:
    """Records by running the step once (its outputs, the graph's), replays nothing."""

    device_type = "cpu"

    def record(self, fn, inputs):
        return fn(*inputs), lambda: None


def fairseq_lstm():
    """fairseq's own lstm_luong_wmt_en_de (4 + 4 LSTM layers, attention) at width 16."""
    import argparse

    from fairseq.models.lstm import LSTMModel, lstm_luong_wmt_en_de

    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)  # the arch's defaults
    LSTMModel.add_args(parser)
    args = parser.parse_args([f"--{part}-{dim}" if i % 2 == 0 else "16"
                              for part, dim in (("encoder", "embed-dim"),
                                                ("encoder", "hidden-size"),
                                                ("decoder", "embed-dim"),
                                                ("decoder", "hidden-size"),
                                                ("decoder", "out-embed-dim"))
                              for i in range(2)])
    lstm_luong_wmt_en_de(args)
    args.criterion = "cross_entropy"
    task = SimpleNamespace(source_dictionary=make_dict(SRC_V), target_dictionary=make_dict(TGT_V))
    return LSTMModel.build_model(args, task)


MODES = ("eager", "attention", "graphs")


def make_case(cell, groups, mode):
    """-> a call that runs one beam search and returns (µs per decoder forward, µs per
    beam-search step); cell None: fairseq's lstm_luong_wmt_en_de; mode one of MODES."""
    graphs = mode == "graphs"
    torch.manual_seed(0)
    model = (fairseq_lstm() if cell is None
             else build_mt(cell=cell, groups=groups, extra=WIDE)).eval()
    _, src, lengths = source_batch((9, 7, 5, 4, 3, 2), seed=5)  # sorted: fairseq's LSTM needs it
    with cuda_path(False):  # the encoder as it is: not timed, once per batch
        encoder_out = model.encoder(src, lengths)
    model.encoder.forward = lambda *args, **kwargs: encoder_out
    if graphs:
        model.decoder.step_graphs = decode_graphs.StepGraphs(NoReplay())
    gen = SequenceGenerator([model], model.decoder.dictionary, beam_size=BEAM, max_len_a=0,
                            max_len_b=LENGTH, min_len=LENGTH)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    forward, spent = model.decoder.forward, [0.0, 0]

    def timed_forward(*args, **kwargs):
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        # no launch wrote the states: finite logits keep the search's steps the same
        out[0].nan_to_num_(0.0, 0.0, 0.0)
        return out

    model.decoder.forward = timed_forward

    def run():
        os.environ["GRNN_DECODE_GRAPHS"] = "1" if graphs else "0"
        triton_attention.VARIANT["attention"] = "1" if mode == "attention" else "0"
        spent[:] = [0.0, 0]
        t0 = time.perf_counter()
        gen.forward(sample)
        total = time.perf_counter() - t0
        return spent[0] / spent[1] * 1e6, total / spent[1] * 1e6
    return run


no_launches()
CONFIGS = [(cell, k) for cell in ("lstm", "gru") for k in (1, 4)]
with torch.no_grad(), cuda_path():
    # every case once per round, round-robin, so that the machine's drifts hit all alike
    cases = [make_case(cell, k, mode) for cell, k in CONFIGS for mode in MODES]
    cases.append(make_case(None, 1, "eager"))
    times = round_robin(cases, ROUNDS)
print(f"host time per beam-search step (µs, median of {ROUNDS} searches, the cases "
      f"round-robin), RNNSearch with 4 "
      f"decoder layers at width 16, beam {BEAM}, 6 sentences x {LENGTH} tokens, "
      f"{torch.get_num_threads()} thread(s); launches and replays are no-ops")
print("(attention: eager with the fused attention; ratios: eager's time / the mode's)")
print(f"{'cell':<5} {'K':>2} {'part':<8} {'eager':>6} {'attention':>9} {'ratio':>6} "
      f"{'graphs':>6} {'ratio':>6}")
med = [tuple(statistics.median(t[i] for t in ts) for i in (0, 1)) for ts in times]
for n, (cell, k) in enumerate(CONFIGS):
    for i, part in enumerate(("decoder", "search")):
        e, a, g = (med[len(MODES) * n + j][i] for j in range(len(MODES)))
        print(f"{cell:<5} {k:>2} {part:<8} {e:>6.0f} {a:>9.0f} {e / a:>6.2f} {g:>6.0f} "
              f"{e / g:>6.2f}")
de, se = med[-1]
print(f"fairseq's lstm_luong_wmt_en_de (eager; LSTMCell as CPU ops): decoder {de:.0f}, "
      f"search {se:.0f}")
