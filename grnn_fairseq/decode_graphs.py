"""Incremental decoding replayed from CUDA graphs (``GRNN_DECODE_GRAPHS=1``, off by default).

On the GPU one decoder step of RNNSearch is a few dozen small kernels (the attention, one
fused launch per recurrent layer, the readout, the output projection), each launched from
Python. The host, not the GPU, bounds beam search (results/gpu_h100/README.md). A CUDA
graph records the launches of one step once; later steps replay them with one call.

A graph keeps the shapes and addresses it was recorded with, and beam search changes
shapes: every batch has its own source length, and the batch shrinks as sentences finish.
So shapes go to buckets (:func:`source_bucket`, :func:`length_bucket`), each bucket gets
one graph the first time it is needed, and inputs are copied into that graph's own input
tensors before each replay. Padded sources and positions are masked out of the attention
(exactly: their weights are 0); the rows of padded sources decode a padding token and are
dropped. At most ``GRNN_DECODE_GRAPHS_MAX`` graphs (default 64) are kept, the least
recently used dropped first. They share one memory pool, so **a replay's outputs are valid
until the next replay**: the decoder hands them to beam search, which reads them (or copies
them) before it asks for the next step.

What a graph cannot hold falls back to the eager step: training, autograd, dropout kept on
in generation (``--retain-dropout``), tensors not on a CUDA device.
"""
import os
import weakref
from collections import OrderedDict

import torch

from .errors import ConfigError

SWITCH = "GRNN_DECODE_GRAPHS"
LIMIT = "GRNN_DECODE_GRAPHS_MAX"
LENGTH_STEP = 16  # source lengths round up to a multiple of this


def enabled():
    """Whether ``GRNN_DECODE_GRAPHS`` asks for graphs (0 | 1, default 0)."""
    value = os.environ.get(SWITCH, "0")
    if value not in ("0", "1"):
        raise ConfigError(f"{SWITCH}={value!r} is not 0 or 1: set {SWITCH}=1 to replay "
                          f"decoder steps from CUDA graphs, 0 (the default) for the eager step")
    return value == "1"


def graph_limit():
    """``GRNN_DECODE_GRAPHS_MAX``: how many graphs are kept at most (default 64)."""
    value = os.environ.get(LIMIT, "64")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{LIMIT}={value!r} is not a whole number >= 1: it bounds how many "
                          f"decoder-step graphs are kept (default 64)")
    return int(value)


def source_bucket(n):
    """The number of sources a graph is recorded for: n rounded up to 1, 2, 3, 4, 6, 8, 12,
    16, 24, ... (a power of two, or three times one), at most a third more than n."""
    if n < 1:
        raise ValueError(f"source_bucket: n = {n} < 1")
    p = 1 << (n - 1).bit_length()  # the power of two >= n
    return p * 3 // 4 if p >= 4 and p * 3 // 4 >= n else p


def length_bucket(s):
    """The source length a graph is recorded for: s rounded up to a multiple of 16."""
    return -(-s // LENGTH_STEP) * LENGTH_STEP


class CudaRecorder:
    """Records ``fn(*inputs)`` as a CUDA graph in a memory pool shared by every graph it
    records, after one eager warm-up run on a side stream (Triton compiles and cuBLAS
    sets up there, not inside the recording)."""

    device_type = "cuda"

    def __init__(self):
        self.pool = None

    def record(self, fn, inputs):
        """-> (outputs, replay): ``replay()`` reruns the recorded kernels, which read
        ``inputs`` and overwrite ``outputs`` in place."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = fn(*inputs)
        except RuntimeError as e:
            raise RuntimeError(
                f"grnn_fairseq: recording a CUDA graph of the decoder step failed ({e}); "
                f"decode without graphs: unset {SWITCH} or set it to 0") from e
        return outputs, graph.replay


class StepGraphs:
    """The graphs of one decoder, one per shape bucket, the least recently used dropped
    first once there are more than ``limit``.

    ``get(key, make)`` returns the entry of ``key``, made by ``make(recorder)`` the first
    time (an object with ``replay``); ``recorded`` counts the graphs recorded so far."""

    def __init__(self, recorder=None, limit=None):
        self.recorder = recorder if recorder is not None else CudaRecorder()
        self.limit = limit
        self.entries = OrderedDict()
        self.recorded = 0

    def get(self, key, make):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        limit = self.limit if self.limit is not None else graph_limit()
        while len(self.entries) >= limit:
            self.entries.popitem(last=False)
        entry = make(self.recorder)
        self.entries[key] = entry
        self.recorded += 1
        return entry


class StepGraph:
    """One recorded decoder step, for one bucket: ``n_sources`` sources of ``length``
    positions, ``rows`` decoder rows per source.

    ``fn(tokens [R], mask [S', N'], states [X, R, m], *sources [S', N', ...])`` -> (logits
    [R, V], attention [R, S'], new states [X, R, m]) is recorded on this graph's own input
    tensors, with N' = ``n_sources``, S' = ``length`` and R = N' * ``rows``: the decoder's
    step, on its states stacked along the first dimension and on the encoder outputs
    ``sources`` (values, keys), where the mask marks padding True."""

    def __init__(self, recorder, fn, tokens, states, sources, n_sources, length, rows):
        r = n_sources * rows
        self.tokens = tokens.new_zeros(r)
        self.states = states.new_zeros(states.shape[0], r, *states.shape[2:])
        self.sources = [t.new_zeros(length, n_sources, *t.shape[2:]) for t in sources]
        self.mask = torch.ones(length, n_sources, dtype=torch.bool, device=tokens.device)
        self.mask[0] = False  # a padded source attends to its first (zero) position: no NaN
        # weak references to the encoder outputs copied in last: compared by identity (a
        # freed tensor's reference is dead, so new outputs at its address are copied in),
        # without keeping a past batch's encoder outputs alive in every bucket's graph
        self.fed = None
        self.outputs, self.replay = recorder.record(
            fn, (self.tokens, self.mask, self.states, *self.sources))

    def __call__(self, tokens, states, sources, mask):
        """Copy a step's inputs in (the encoder outputs only when they are not the ones
        copied last), replay -> (logits [B, V], attention [B, S], new states [X, B, m]),
        views of the outputs, valid until the next replay."""
        b = tokens.shape[0]
        s, n = sources[0].shape[:2]
        self.tokens[:b].copy_(tokens)
        self.states[:, :b].copy_(states)
        fed = (mask, *sources)
        if not self._fed_last(fed):
            for dst, src in zip(self.sources, sources):
                dst[:s, :n].copy_(src)
            self.mask.fill_(True)
            self.mask[0, n:] = False
            if mask is None:
                self.mask[:s, :n] = False
            else:
                self.mask[:s, :n].copy_(mask)
            self.fed = tuple(None if t is None else weakref.ref(t) for t in fed)
        self.replay()
        logits, attn, new_states = self.outputs
        return logits[:b], attn[:b, :s], new_states[:, :b]

    def _fed_last(self, fed):
        """Whether ``fed`` (the mask or None, then the encoder outputs) are the very
        tensors copied in last."""
        if self.fed is None:
            return False
        for ref, t in zip(self.fed, fed):
            if (ref is None or t is None) and ref is not t:
                return False   # a mask where there was none, or none where there was one
            if ref is not None and ref() is not t:
                return False
        return True
