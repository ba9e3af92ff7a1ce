"""Decoding from CUDA graphs (grnn_fairseq.decode_graphs, GRNN_DECODE_GRAPHS=1) against the
eager decoder.

Without a GPU the graphs are played by :class:`FakeRecorder`, which keeps a CUDA graph's
rules: the recorded function runs on the graph's own input tensors, every replay writes
into the outputs of the recording, and reading a tensor's value on the host (a
synchronisation, which a CUDA graph cannot record) fails.  That checks what the graphs add
in the model (buckets, padded sources and positions, the inputs copied in, the cache) on
every CI run; on a GPU the same comparisons run with real graphs.
"""
import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from torch.utils._python_dispatch import TorchDispatchMode

from grnn_fairseq import decode_graphs
from grnn_fairseq.errors import ConfigError

from test_models import _model_with_varied_lengths, max_diff, source_batch

CUDA = torch.cuda.is_available()


class NoHostSync(TorchDispatchMode):
    """Fails on the operators that read a tensor's value on the host (``.item()``,
    ``bool(t)``, ``torch.equal``) or make a tensor of host data (``torch.tensor(list)``,
    a copy from the host on a GPU): a CUDA graph cannot record them."""

    SYNCS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item"}
    FROM_HOST = {"aten::lift_fresh", "aten::lift_fresh_copy"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCS:
            raise AssertionError(f"{func._schema.name}: a host synchronisation in a graph")
        if func._schema.name in self.FROM_HOST:
            raise AssertionError(f"{func._schema.name}: a tensor of host data in a graph")
        return func(*args, **(kwargs or {}))


class FakeRecorder:
    """``decode_graphs.CudaRecorder``'s contract on the CPU (see the module docstring)."""

    device_type = "cpu"

    def __init__(self):
        self.replays = 0

    def record(self, fn, inputs):
        fn(*inputs)  # the warm-up run
        with NoHostSync():
            outputs = fn(*inputs)

        def replay():
            with NoHostSync():
                fresh = fn(*inputs)
            for out, new in zip(outputs, fresh):
                assert out.shape == new.shape and out.dtype == new.dtype
                out.copy_(new)
            self.replays += 1
        return outputs, replay


def with_graphs(model, monkeypatch, limit=None):
    monkeypatch.setenv("GRNN_DECODE_GRAPHS", "1")
    model.decoder.step_graphs = decode_graphs.StepGraphs(FakeRecorder(), limit=limit)
    return model.decoder.step_graphs


def beam_search(model, src, lengths, max_len, beam=5):
    gen = SequenceGenerator([model], model.decoder.dictionary, beam_size=beam, max_len_a=0,
                            max_len_b=max_len)
    return gen.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})


def assert_same_hypotheses(a_all, b_all, tol):
    assert len(a_all) == len(b_all)
    for a, b in zip(a_all, b_all):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(x["tokens"], y["tokens"])
            assert max_diff(x["positional_scores"], y["positional_scores"]) < tol
            assert max_diff(x["attention"], y["attention"]) < tol


# --------------------------------------------------------------------------- buckets
def test_buckets_against_their_definitions():
    sizes = sorted({c * 2 ** i for c in (1, 3) for i in range(12)})
    for n in range(1, 600):
        assert decode_graphs.source_bucket(n) == min(c for c in sizes if c >= n)
    for s in range(1, 300):
        b = decode_graphs.length_bucket(s)
        assert b % 16 == 0 and s <= b < s + 16
    with pytest.raises(ValueError):
        decode_graphs.source_bucket(0)


@pytest.mark.parametrize("name,value", [("GRNN_DECODE_GRAPHS", "yes"),
                                        ("GRNN_DECODE_GRAPHS_MAX", "0"),
                                        ("GRNN_DECODE_GRAPHS_MAX", "many")])
def test_bad_switch_values_are_refused_by_name(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        decode_graphs.enabled() if name == "GRNN_DECODE_GRAPHS" else decode_graphs.graph_limit()


def test_the_fake_recorder_refuses_what_a_graph_cannot_record():
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="host synchronisation"):
        FakeRecorder().record(lambda t: (t * float(t.sum().item()),), (x,))
    with pytest.raises(AssertionError, match="host synchronisation"):
        FakeRecorder().record(lambda t: (t * 2 if bool(t.any()) else t,), (x,))
    with pytest.raises(AssertionError, match="host data"):
        FakeRecorder().record(lambda t: (t + torch.tensor([1.0, 2.0, 3.0]),), (x,))
    outputs, replay = FakeRecorder().record(lambda t: (t * 2,), (x,))
    x.fill_(3)
    replay()
    assert outputs[0].tolist() == [6.0, 6.0, 6.0]  # a replay reads the inputs in place


def test_a_graph_keeps_no_encoder_outputs_of_a_past_batch():
    """A graph remembers which encoder outputs it copied in last without keeping them
    alive: once a batch's outputs are freed they are gone, and the next batch's outputs
    (of another length, and with a mask after none) are copied in and used; so is a mask
    that comes or goes with the same outputs."""
    import gc
    import weakref

    def fn(tokens, mask, states, values, keys):
        real = (~mask).unsqueeze(-1).type_as(values)
        return (values * real).sum(0) + keys.sum(0), real[..., 0].t(), states + 1

    tokens, states = torch.zeros(2, dtype=torch.long), torch.zeros(1, 2, 3)
    values, keys = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    graph = decode_graphs.StepGraph(FakeRecorder(), fn, tokens, states, (values, keys),
                                    2, 16, 1)
    logits, _, _ = graph(tokens, states, (values, keys), None)
    assert max_diff(logits, values.sum(0) + keys.sum(0)) < 1e-6
    gone = weakref.ref(values)
    del values, keys, logits
    gc.collect()
    assert gone() is None
    values, keys = torch.randn(7, 2, 3), torch.randn(7, 2, 3)
    mask = torch.zeros(7, 2, dtype=torch.bool)
    mask[:2, 1] = True
    logits, attn, _ = graph(tokens, states, (values, keys), mask)
    want = (values * (~mask).unsqueeze(-1)).sum(0) + keys.sum(0)
    assert max_diff(logits, want) < 1e-6 and attn.shape == (2, 7)
    logits, _, _ = graph(tokens, states, (values, keys), None)  # the mask dropped alone
    assert max_diff(logits, values.sum(0) + keys.sum(0)) < 1e-6
    logits, _, _ = graph(tokens, states, (values, keys), mask)  # and back
    assert max_diff(logits, want) < 1e-6


# --------------------------------------------------------------------------- beam search
@pytest.mark.parametrize("cell,groups,rate", [("lstm", 2, 0.5), ("gru", 1, 0.0),
                                              ("lstm", 4, 0.0), ("rnn", 2, 0.0)])
def test_beam_search_with_graphs_equals_eager(cell, groups, rate, monkeypatch):
    """fairseq's beam search (beam 5; sentences of different source lengths, left-padded,
    finishing at different steps, so the batch shrinks, across buckets where it shrinks
    enough, and the encoder outputs change mid-search) gives the same hypotheses, scores
    and attention."""
    _, src, lengths = source_batch((7, 3, 5, 2, 9, 4), seed=5)
    max_len = 12
    model = _model_with_varied_lengths(cell, groups, rate, src, lengths, max_len)
    eager = beam_search(model, src, lengths, max_len)
    graphs = with_graphs(model, monkeypatch)
    sources = watch_sources(model, monkeypatch)
    replayed = beam_search(model, src, lengths, max_len)
    assert_same_hypotheses(replayed, eager, 1e-10)
    assert len(set(sources)) > 1  # the batch shrank: the test kept its point
    keys = list(graphs.entries)  # one graph per bucket of the source counts seen
    assert sorted(k[0] for k in keys) == sorted({decode_graphs.source_bucket(n) for n in sources})
    assert len(keys) == graphs.recorded and all(k[1:3] == (16, 5) for k in keys)
    assert graphs.recorder.replays > graphs.recorded  # buckets were replayed, not re-recorded


def watch_sources(model, monkeypatch):
    """-> the list of source counts the decoder's steps see (filled as beam search runs)."""
    seen, step = [], model.decoder._graphed_step

    def watch(tokens, encoder_out, incremental_state):
        seen.append(encoder_out["values"].shape[1])
        return step(tokens, encoder_out, incremental_state)

    monkeypatch.setattr(model.decoder, "_graphed_step", watch)
    return seen


def test_beam_search_without_padding_and_with_one_graph(monkeypatch):
    """Sources of one length (no padding mask), and at most one graph kept: every change of
    bucket records again, and results stay the same."""
    _, src, lengths = source_batch((6, 6, 6, 6), seed=3)
    model = _model_with_varied_lengths("lstm", 2, 0.0, src, lengths, 10)
    eager = beam_search(model, src, lengths, 10, beam=3)
    graphs = with_graphs(model, monkeypatch, limit=1)
    assert_same_hypotheses(beam_search(model, src, lengths, 10, beam=3), eager, 1e-10)
    assert len(graphs.entries) == 1 and graphs.recorded >= 2


def test_graphs_reused_by_the_next_batch(monkeypatch):
    """A second batch with shorter sources in the same buckets replays the first batch's
    graphs: what the first batch left in them (longer sources) is masked out."""
    _, long_src, long_len = source_batch((9, 8, 9, 7), seed=7)
    _, short_src, short_len = source_batch((3, 5, 4, 2), seed=2)
    model = _model_with_varied_lengths("lstm", 2, 0.0, short_src, short_len, 10)
    eager = [beam_search(model, s, n, 10, beam=3) for s, n in ((long_src, long_len),
                                                               (short_src, short_len))]
    graphs = with_graphs(model, monkeypatch)
    beam_search(model, long_src, long_len, 10, beam=3)
    recorded = graphs.recorded
    assert_same_hypotheses(beam_search(model, short_src, short_len, 10, beam=3), eager[1], 1e-10)
    assert graphs.recorded == recorded  # nothing new recorded: the same buckets
    assert_same_hypotheses(beam_search(model, long_src, long_len, 10, beam=3), eager[0], 1e-10)


def test_incremental_steps_with_reorders_equal_eager(monkeypatch):
    """Decoder steps with a cache that is reordered (rows dropped and repeated) between
    steps, as beam search does: logits, attention and the next steps' inputs agree."""
    _, src, lengths = source_batch((7, 3, 5, 2, 9), seed=4)
    model = _model_with_varied_lengths("gru", 2, 0.0, src, lengths, 10)
    enc = model.encoder(src, lengths)
    orders = [torch.tensor([4, 0, 2, 1, 3]), torch.tensor([1, 1, 3, 0]),
              torch.tensor([3, 0, 2]), torch.tensor([2, 2])]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 27, (5, 1 + len(orders)), generator=g)

    def run():
        state, e, prev, outs = {}, enc, tokens, []
        for t in range(len(orders) + 1):
            logits, extra = model.decoder(prev[:, : t + 1], encoder_out=e, incremental_state=state)
            outs.append((logits.clone(), extra["attn"][0].clone()))
            if t < len(orders):
                model.decoder.reorder_incremental_state(state, orders[t])
                e = model.encoder.reorder_encoder_out(e, orders[t])
                prev = prev.index_select(0, orders[t])
        return outs

    with torch.no_grad():
        eager = run()
        graphs = with_graphs(model, monkeypatch)
        replayed = run()
    assert graphs.recorded >= 2
    for (la, aa), (lb, ab) in zip(replayed, eager):
        assert la.shape == lb.shape and aa.shape == ab.shape
        assert max_diff(la, lb) < 1e-10 and max_diff(aa, ab) < 1e-10


def test_graphs_step_aside_where_they_cannot_apply(monkeypatch):
    """Training, autograd, --retain-dropout, or the switch at 0: the eager step, nothing
    recorded."""
    _, src, lengths = source_batch((5, 3), seed=2)
    model = _model_with_varied_lengths("lstm", 1, 0.0, src, lengths, 8)
    graphs = with_graphs(model, monkeypatch)
    enc = model.encoder(src, lengths)
    prev = torch.full((2, 1), 2)

    def step():
        return model.decoder(prev, encoder_out=enc, incremental_state={})[0]

    step()  # autograd on
    with torch.no_grad():
        model.train()
        step()
        model.eval()
        model.decoder.dropout_out.apply_during_inference = True
        model.decoder.dropout_out.p = 0.1
        step()
        model.decoder.dropout_out.apply_during_inference = False
        monkeypatch.setenv("GRNN_DECODE_GRAPHS", "0")
        step()
        assert graphs.recorded == 0
        monkeypatch.setenv("GRNN_DECODE_GRAPHS", "1")
        step()
        assert graphs.recorded == 1


@pytest.mark.skipif(CUDA, reason="the Triton interpreter runs on CPU tensors")
def test_beam_search_with_graphs_on_the_triton_step(monkeypatch):
    """The decoder's layers as the fused Triton step (through the interpreter), recorded
    and replayed: the same hypotheses as the eager decoder on the same backend."""
    pytest.importorskip("triton")
    from grnn_fairseq.engine import _interpreting

    if not _interpreting():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1")
    _, src, lengths = source_batch((7, 3, 5, 2, 9, 4), seed=5)
    model = _model_with_varied_lengths("lstm", 2, 0.0, src, lengths, 8).float()
    for stack in (model.encoder.rnn, model.decoder.rnn):
        for layer in stack.layers:
            layer.backend = "triton"
    from grnn_fairseq.kernels import triton_rnn

    steps, step = [], triton_rnn.step_triton
    monkeypatch.setattr(triton_rnn, "step_triton", lambda *a: steps.append(1) or step(*a))
    eager = beam_search(model, src, lengths, 8, beam=2)
    assert steps  # the decoder ran the fused step
    graphs = with_graphs(model, monkeypatch)
    assert_same_hypotheses(beam_search(model, src, lengths, 8, beam=2), eager, 1e-5)
    assert graphs.recorded >= 1


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (scripts/gpu-checks.sh first)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cell,groups", [("lstm", 4), ("gru", 2)])
def test_cuda_graphs_beam_search_equals_eager(cell, groups, dtype, monkeypatch):
    """Real CUDA graphs, on the default (Triton) backend: the same hypotheses as the eager
    decoder."""
    _, src, lengths = source_batch((7, 3, 5, 2, 9, 4), seed=5)
    model = _model_with_varied_lengths(cell, groups, 0.0, src, lengths, 12)
    model = model.to("cuda", dtype)
    src, lengths = src.cuda(), lengths.cuda()
    monkeypatch.delenv("GRNN_DECODE_GRAPHS", raising=False)
    eager = beam_search(model, src, lengths, 12)
    monkeypatch.setenv("GRNN_DECODE_GRAPHS", "1")
    model.decoder.step_graphs = None  # made at the first step, with the CUDA recorder
    replayed = beam_search(model, src, lengths, 12)
    graphs = model.decoder.step_graphs
    assert isinstance(graphs.recorder, decode_graphs.CudaRecorder) and graphs.recorded >= 2
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_same_hypotheses(replayed, eager, tol)
