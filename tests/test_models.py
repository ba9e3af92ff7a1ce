"""Model-level tests of the fairseq models (RNNSearch and the recurrent LMs), in process.

Every comparison is against something computed another way: incremental decoding against
the teacher-forced forward, a reordered cache against the reordered batch run from
scratch, fairseq's beam search (beam 1) against a greedy loop written here, a sentence in
a padded batch against the sentence alone, reduced precision against float32, and the
K=1, r=0 models against the papers' equations written with torch.nn cells.
"""
import argparse
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import grnn_fairseq  # noqa: F401  (registers the models)
from fairseq import options, tasks
from fairseq.data import Dictionary
from fairseq.data.data_utils import collate_tokens
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import (
    ARCH_CONFIG_REGISTRY,
    ARCH_MODEL_NAME_REGISTRY,
    ARCH_MODEL_REGISTRY,
    MODEL_REGISTRY,
)
from fairseq.sequence_generator import SequenceGenerator

from grnn_fairseq.attention import AdditiveAttention
from grnn_fairseq.models.rnn_lm import RecurrentLanguageModel
from grnn_fairseq.models.rnnsearch import RNNSearchModel
from grnn_fairseq.params import build_architecture

SRC_V, TGT_V = 23, 27  # dictionary sizes (4 specials: bos 0, pad 1, eos 2, unk 3)
PAD, EOS = 1, 2
FIRST = 4  # first ordinary token

MT_TINY = ["--encoder-embed-dim", "16", "--encoder-hidden-size", "16",
           "--decoder-embed-dim", "16", "--decoder-hidden-size", "16",
           "--decoder-out-embed-dim", "16", "--attention-dim", "12",
           "--encoder-layers", "2", "--decoder-layers", "2"]
LM_TINY = ["--decoder-embed-dim", "16", "--decoder-hidden-size", "16", "--decoder-layers", "2"]


# --------------------------------------------------------------------------- builders
def make_dict(size):
    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"w{i}")
    assert len(d) == size and d.pad() == PAD and d.eos() == EOS
    return d


def recurrent_opts(cell, groups, rate, part=("encoder", "decoder")):
    opts = ["--cell", cell, "--sharing-rate", str(rate)]
    for p in part:
        opts += [f"--{p}-groups", str(groups)]
    return opts


def build(model_cls, overrides, src_dict=None, tgt_dict=None):
    """Build a model class with its base defaults only (no named architecture), so every
    option (untied embeddings included) is what the overrides say."""
    parser = argparse.ArgumentParser()
    model_cls.add_args(parser)
    args = parser.parse_args(list(overrides))
    args.arch = "test"
    task = SimpleNamespace(src_dict=src_dict, tgt_dict=tgt_dict, source_dictionary=src_dict,
                           target_dictionary=tgt_dict, dictionary=tgt_dict)
    return model_cls.build_model(args, task)


def build_mt(cell="lstm", groups=1, rate=0.0, tied=True, dropout=0.0, share_all=False,
             extra=(), seed=0):
    torch.manual_seed(seed)
    src = make_dict(SRC_V)
    tgt = src if share_all else make_dict(TGT_V)
    opts = MT_TINY + recurrent_opts(cell, groups, rate) + ["--dropout", str(dropout)] + list(extra)
    if tied:
        opts.append("--share-decoder-input-output-embed")
    if share_all:
        opts.append("--share-all-embeddings")
    return build(RNNSearchModel, opts, src, tgt)


def build_lm(cell="lstm", groups=1, rate=0.0, tied=False, out_dim=None, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    d = make_dict(TGT_V)
    opts = LM_TINY + recurrent_opts(cell, groups, rate, ["decoder"]) + ["--dropout", str(dropout)]
    if out_dim is not None:
        opts += ["--decoder-out-embed-dim", str(out_dim)]
    if tied:
        opts.append("--share-decoder-input-output-embed")
    return build(RecurrentLanguageModel, opts, None, d)


# --------------------------------------------------------------------------- data
def sentences(lengths, vocab, seed):
    """Random sentences of the given lengths (EOS included at the end)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(FIRST, vocab, (n - 1,), generator=g), torch.tensor([EOS])])
            for n in lengths]


def source_batch(lengths=(7, 3, 5, 1), left_pad=True, seed=1):
    """Left-padded (fairseq's translation default) sources of different lengths."""
    sents = sentences(lengths, SRC_V, seed)
    return sents, collate_tokens(sents, PAD, left_pad=left_pad), torch.tensor(lengths)


def prev_tokens(batch, steps, vocab=TGT_V, seed=2):
    """Teacher-forced decoder inputs: EOS (fairseq's BOS of the target) then random tokens."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(FIRST, vocab, (batch, steps - 1), generator=g)
    return torch.cat([torch.full((batch, 1), EOS), body], dim=1)


def incremental(decoder, prev, **kw):
    """Run the decoder one position at a time with a cache, as SequenceGenerator does."""
    state, outs = {}, []
    for t in range(prev.shape[1]):
        outs.append(decoder(prev[:, : t + 1], incremental_state=state, **kw)[0])
    return torch.cat(outs, dim=1), state


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


MT_CONFIGS = [(cell, k, r) for cell in ("lstm", "gru") for k in (1, 4) for r in (0.0, 0.5)]
TOL64 = 1e-9  # float64: both paths do the same arithmetic, only summation order may differ


# ---------------------------------------------------------------------- 1. incremental decoding
@pytest.mark.parametrize("cell,groups,rate", MT_CONFIGS)
def test_rnnsearch_incremental_equals_teacher_forced(cell, groups, rate):
    model = build_mt(cell, groups, rate).double().eval()
    _, src, lengths = source_batch()
    prev = prev_tokens(src.shape[0], 6)
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        full, extra = model.decoder(prev, encoder_out=enc)
        step, _ = incremental(model.decoder, prev, encoder_out=enc)
    assert full.shape == (src.shape[0], 6, TGT_V)
    assert extra["attn"][0].shape == (src.shape[0], 6, src.shape[1])
    assert max_diff(step, full) < TOL64


@pytest.mark.parametrize("cell,groups,rate", [("lstm", 4, 0.5), ("gru", 1, 0.0), ("lstm", 1, 0.0)])
def test_rnnsearch_reorder_equals_permuted_batch(cell, groups, rate):
    """After k cached steps, reorder (with repeats, as beam search does) and go on: equal to
    the permuted batch decoded from scratch."""
    model = build_mt(cell, groups, rate).double().eval()
    _, src, lengths = source_batch()
    prev = prev_tokens(src.shape[0], 7)
    order = torch.tensor([2, 0, 0, 3])
    k = 3
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        _, state = incremental(model.decoder, prev[:, :k], encoder_out=enc)
        model.decoder.reorder_incremental_state_scripting(state, order)
        enc2 = model.encoder.reorder_encoder_out(enc, order)
        p2 = prev[order]
        outs = [model.decoder(p2[:, : t + 1], encoder_out=enc2, incremental_state=state)[0]
                for t in range(k, p2.shape[1])]
        ref_enc = model.encoder(src[order], src_lengths=lengths[order])
        ref = model.decoder(p2, encoder_out=ref_enc)[0][:, k:]
    assert max_diff(torch.cat(outs, 1), ref) < TOL64


def test_rnnsearch_beam_reorders_keep_one_encoder_output_per_source():
    """Beam search's reorders (expand each source to E rows, reorder rows within a source,
    drop finished sources) keep the encoder outputs once per source (rows_per_source = E)
    and give what the permuted batch decoded from scratch gives; a reorder mixing sources
    falls back to one row per source."""
    model = build_mt("lstm", 2, 0.0).double().eval()
    _, src, lengths = source_batch()
    beam = 3
    prev = prev_tokens(4 * beam, 9)
    expand = torch.arange(4).repeat_interleave(beam)
    steps = [  # (order of this reorder, expected rows_per_source, expected sources kept)
        (torch.tensor([2, 0, 1, 3, 3, 5, 8, 6, 7, 9, 11, 9]), beam, 4),  # within each source
        (torch.tensor([0, 0, 2, 6, 7, 8, 10, 11, 9]), beam, 3),         # source 1 finished
        (torch.tensor([3, 4, 5, 0, 1, 2, 8, 7, 6]), beam, 3),           # sources swapped
        (torch.tensor([0, 3, 6, 1, 4]), 1, 5),                         # mixed: per row
    ]
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        enc = model.encoder.reorder_encoder_out(enc, expand)
        assert enc["rows_per_source"] == beam and enc["values"].shape[1] == 4
        rows = expand.clone()  # the source sentence of every decoder row
        p = prev
        state = {}
        outs, t = [], 0
        for order, e, n_src in steps:
            for _ in range(2):
                outs.append(model.decoder(p[:, : t + 1], encoder_out=enc,
                                          incremental_state=state)[0])
                t += 1
            model.decoder.reorder_incremental_state_scripting(state, order)
            enc = model.encoder.reorder_encoder_out(enc, order)
            assert enc["rows_per_source"] == e and enc["values"].shape[1] == n_src
            assert enc["keys"].shape[1] == enc["init"].shape[0] == n_src
            rows, p = rows[order], p[order]
            outs = [o[order] for o in outs]
        outs.append(model.decoder(p[:, : t + 1], encoder_out=enc, incremental_state=state)[0])
        ref_enc = model.encoder(src[rows], src_lengths=lengths[rows])
        ref = model.decoder(p[:, : t + 1], encoder_out=ref_enc)[0]
    assert max_diff(torch.cat(outs, 1), ref) < TOL64


@pytest.mark.parametrize("cell,groups", [("lstm", 2), ("gru", 1)])
def test_beam5_same_with_and_without_per_source_encoder_outputs(cell, groups, monkeypatch):
    """fairseq's beam search (beam 5, sentences finishing at different steps) gives the same
    hypotheses and scores whether the encoder outputs stay per source or are copied per row."""
    _, src, lengths = source_batch((7, 3, 5, 2, 9, 4), seed=5)
    max_len = 12
    model = _model_with_varied_lengths(cell, groups, 0.0, src, lengths, max_len)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    gen = SequenceGenerator([model], model.decoder.dictionary, beam_size=5, max_len_a=0,
                            max_len_b=max_len)
    seen = []
    grouped = model.encoder.reorder_encoder_out

    def watch(encoder_out, new_order):
        out = grouped(encoder_out, new_order)
        seen.append(out["rows_per_source"])
        return out

    monkeypatch.setattr(model.encoder, "reorder_encoder_out", watch)
    fast = gen.forward(sample)
    assert seen and all(e == 5 for e in seen)
    assert len({len(h[0]["tokens"]) for h in fast}) > 1  # sentences finished at different steps

    def per_row(encoder_out, new_order):  # the plain reorder: every row its own copy
        e = encoder_out["rows_per_source"]
        return type(model.encoder)._pick_sources(encoder_out, new_order // e, 1)

    monkeypatch.setattr(model.encoder, "reorder_encoder_out", per_row)
    slow = gen.forward(sample)
    for a, b in zip(fast, slow):
        assert len(a) == len(b) == 5
        for x, y in zip(a, b):
            assert torch.equal(x["tokens"], y["tokens"])
            assert max_diff(x["positional_scores"], y["positional_scores"]) < 1e-10


def test_diverse_beam_search_batch_equals_each_sentence_alone():
    """fairseq's diverse beam search (--diverse-beam-groups) on a batch whose dataset ids are
    not 0..B-1 (any batch after the first) gives what each sentence gives alone.  fairseq
    0.12.3 indexes its per-sentence overlap counts by dataset id and stops with an
    IndexError there; grnn_fairseq.compat maps the ids to rows."""
    from fairseq import search

    _, src, lengths = source_batch((7, 3, 5, 2, 9, 4), seed=5)
    max_len = 12
    model = _model_with_varied_lengths("lstm", 2, 0.0, src, lengths, max_len)
    tgt_dict = model.decoder.dictionary

    def decode(rows, ids):
        gen = SequenceGenerator([model], tgt_dict, beam_size=4, max_len_a=0, max_len_b=max_len,
                                search_strategy=search.DiverseBeamSearch(tgt_dict, 2, 0.5))
        n = int(lengths[rows].max())  # the batch left-padded to its longest sentence
        sample = {"id": torch.tensor(ids), "net_input": {
            "src_tokens": src[rows][:, src.shape[1] - n:], "src_lengths": lengths[rows]}}
        return gen.forward(sample)

    rows = [4, 0, 2, 5, 1, 3]
    batch = decode(rows, [1040, 17, 305, 88, 5, 612])
    assert len({len(h[0]["tokens"]) for h in batch}) > 1  # sentences finished at different steps
    for row, hyps in zip(rows, batch):
        alone = decode([row], [0])[0]
        assert len(hyps) == len(alone) == 4
        for x, y in zip(hyps, alone):
            assert torch.equal(x["tokens"], y["tokens"])
            assert max_diff(x["positional_scores"], y["positional_scores"]) < 1e-8


LM_CONFIGS = [("lstm", 1, 0.0), ("lstm", 4, 0.5), ("gru", 1, 0.5), ("gru", 4, 0.0),
              ("rnn", 2, 0.5)]


@pytest.mark.parametrize("cell,groups,rate", LM_CONFIGS)
def test_lm_incremental_equals_teacher_forced(cell, groups, rate):
    model = build_lm(cell, groups, rate, out_dim=12).double().eval()
    prev = prev_tokens(3, 8)
    with torch.no_grad():
        full = model.decoder(prev)[0]
        step, _ = incremental(model.decoder, prev)
    assert full.shape == (3, 8, TGT_V)
    assert max_diff(step, full) < TOL64


@pytest.mark.parametrize("cell,groups,rate", [("lstm", 4, 0.5), ("gru", 1, 0.0)])
def test_lm_reorder_equals_permuted_batch(cell, groups, rate):
    model = build_lm(cell, groups, rate).double().eval()
    prev = prev_tokens(4, 7)
    order, k = torch.tensor([3, 3, 1, 0]), 4
    with torch.no_grad():
        _, state = incremental(model.decoder, prev[:, :k])
        model.decoder.reorder_incremental_state_scripting(state, order)
        p2 = prev[order]
        outs = [model.decoder(p2[:, : t + 1], incremental_state=state)[0] for t in range(k, 7)]
        ref = model.decoder(p2)[0][:, k:]
    assert max_diff(torch.cat(outs, 1), ref) < TOL64


# --------------------------------------------------------------------------- the equations
def _copy_cell(dst, weights, sfx=""):
    w_ih, w_hh, b_ih, b_hh = weights()  # K=1 canonical layout: [1, G*H, I] ...
    with torch.no_grad():
        getattr(dst, "weight_ih" + sfx).copy_(w_ih[0])
        getattr(dst, "weight_hh" + sfx).copy_(w_hh[0])
        getattr(dst, "bias_ih" + sfx).copy_(b_ih[0])
        getattr(dst, "bias_hh" + sfx).copy_(b_hh[0])


def reference_rnnsearch(model, src, prev, cell):
    """Bahdanau et al. (2015) for one sentence (no padding), with torch.nn layers and the
    model's weights: bidirectional encoder, s_0 = tanh(W_s mean h), e = v tanh(W s + U h),
    s_i = RNN([E y; c], s_{i-1}), logits = W_y tanh(W_o [s_i; E y; c])."""
    enc, dec = model.encoder, model.decoder
    rnn_cls, cell_cls = {"lstm": (torch.nn.LSTM, torch.nn.LSTMCell),
                         "gru": (torch.nn.GRU, torch.nn.GRUCell)}[cell]
    e, h = enc.rnn.input_size, enc.rnn.hidden_size
    ref = rnn_cls(e, h, enc.rnn.num_layers, bidirectional=True).double()
    for l, layer in enumerate(enc.rnn.layers):
        _copy_cell(ref, layer.directions[0], f"_l{l}")
        _copy_cell(ref, layer.directions[1], f"_l{l}_reverse")
    values = ref(enc.embed_tokens(src).unsqueeze(1))[0][:, 0]  # [S, 2H]
    keys = values @ enc.attention_keys.weight.t()
    s0 = torch.tanh(enc.init_state(values.mean(0)))
    cells = []
    for layer in dec.rnn.layers:
        c = cell_cls(layer.directions[0]()[0].shape[-1], dec.rnn.hidden_size).double()
        _copy_cell(c, layer.directions[0])
        cells.append(c)
    states = [(s0, torch.zeros_like(s0)) if cell == "lstm" else s0 for _ in cells]
    att = dec.attention
    logits = []
    for y in prev:
        emb = dec.embed_tokens(y)
        query = states[-1][0] if cell == "lstm" else states[-1]
        energy = att.score(torch.tanh(keys + att.query_proj(query))).squeeze(-1)
        context = torch.softmax(energy, 0) @ values
        x = torch.cat([emb, context])
        for i, c in enumerate(cells):
            states[i] = c(x, states[i])
            x = states[i][0] if cell == "lstm" else states[i]
        t = torch.tanh(dec.readout(torch.cat([x, emb, context])))
        logits.append(dec.output_projection(t))
    return torch.stack(logits)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnnsearch_k1_matches_the_equations(cell):
    model = build_mt(cell, 1, 0.0, tied=False).double().eval()
    sents, src, lengths = source_batch((6, 4))
    prev = prev_tokens(2, 5)
    with torch.no_grad():
        out = model(src, lengths, prev)[0]
        for i, s in enumerate(sents):
            assert max_diff(out[i], reference_rnnsearch(model, s, prev[i], cell)) < 1e-10


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_lm_k1_matches_torch(cell):
    model = build_lm(cell, 1, 0.0, out_dim=12).double().eval()
    dec = model.decoder
    ref = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](
        16, 16, 2).double()
    for l, layer in enumerate(dec.rnn.layers):
        _copy_cell(ref, layer.directions[0], f"_l{l}")
    prev = prev_tokens(3, 6)
    with torch.no_grad():
        h = ref(dec.embed_tokens(prev).transpose(0, 1))[0].transpose(0, 1)
        expected = dec.output_projection(dec.out_proj(h))
        assert max_diff(model(prev)[0], expected) < 1e-10


# --------------------------------------------------------------------------- 2. beam 1 == greedy
def greedy(model, src, lengths, max_len, min_len=1):
    """Greedy decoding with SequenceGenerator's constraints (never pad; no EOS before
    min_len; EOS forced at max_len).  -> per sentence (tokens incl. EOS, log-probs)."""
    out = []
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        tokens = torch.full((src.shape[0], 1), EOS)
        state, lps = {}, []
        for step in range(max_len + 1):
            logits = model.decoder(tokens, encoder_out=enc, incremental_state=state)[0][:, -1]
            lp = F.log_softmax(logits.float(), dim=-1)
            lp[:, PAD] = -math.inf
            if step < min_len:
                lp[:, EOS] = -math.inf
            if step >= max_len:
                keep = lp[:, EOS].clone()
                lp.fill_(-math.inf)
                lp[:, EOS] = keep
            best_lp, best = lp.max(-1)
            tokens = torch.cat([tokens, best.unsqueeze(1)], 1)
            lps.append(best_lp)
    lps = torch.stack(lps, 1)
    for i in range(src.shape[0]):
        seq = tokens[i, 1:]
        n = int((seq == EOS).nonzero()[0]) + 1
        out.append((seq[:n], lps[i, :n]))
    return out


def _model_with_varied_lengths(cell, groups, rate, src, lengths, max_len):
    """A random model whose greedy outputs end at different steps (so the generator removes
    finished sentences and reorders the cache mid-search): larger weights than the init
    (less uniform outputs) and an EOS bias, the first of a few that gives varied lengths."""
    for bias in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5):
        model = build_mt(cell, groups, rate, tied=False).double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(5)
            model.decoder.output_projection.bias[EOS] = bias
        lens = {len(t) for t, _ in greedy(model, src, lengths, max_len)}
        if len(lens) > 1:
            return model
    pytest.fail("no EOS bias gave hypotheses of different lengths: the test lost its point")


@pytest.mark.parametrize("cell,groups,rate", [("lstm", 2, 0.5), ("gru", 1, 0.0)])
def test_beam1_equals_greedy(cell, groups, rate):
    _, src, lengths = source_batch((7, 3, 5, 2, 9, 4), seed=5)
    max_len = 12
    model = _model_with_varied_lengths(cell, groups, rate, src, lengths, max_len)
    gen = SequenceGenerator([model], model.decoder.dictionary, beam_size=1, max_len_a=0,
                            max_len_b=max_len)
    hypos = gen.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})
    ours = greedy(model, src, lengths, max_len)
    assert len(hypos) == len(ours)
    for (tokens, lps), h in zip(ours, hypos):
        assert torch.equal(h[0]["tokens"], tokens)
        assert max_diff(h[0]["positional_scores"], lps) < 1e-5
        assert abs(h[0]["score"].item() - lps.sum().item() / len(lps)) < 1e-5


# --------------------------------------------------------------------------- 3. padding
@pytest.mark.parametrize("cell,groups,rate", [("lstm", 1, 0.0), ("lstm", 4, 0.5), ("gru", 2, 0.0)])
@pytest.mark.parametrize("left_pad", [True, False], ids=["left", "right"])
def test_padding_does_not_change_a_sentence(cell, groups, rate, left_pad):
    model = build_mt(cell, groups, rate).double().eval()
    sents, src, lengths = source_batch((5, 9, 2, 6), left_pad=left_pad)
    prev = prev_tokens(len(sents), 4)
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        logits = model.decoder(prev, encoder_out=enc)[0]
        s = src.shape[1]
        for i, sent in enumerate(sents):
            n = len(sent)
            real = slice(s - n, s) if left_pad else slice(0, n)
            alone = model.encoder(sent.unsqueeze(0), src_lengths=torch.tensor([n]))
            assert max_diff(enc["values"][real, i], alone["values"][:, 0]) < TOL64
            assert max_diff(enc["keys"][real, i], alone["keys"][:, 0]) < TOL64
            assert max_diff(enc["init"][i], alone["init"][0]) < TOL64
            alone_logits = model.decoder(prev[i:i + 1], encoder_out=alone)[0]
            assert max_diff(logits[i], alone_logits[0]) < TOL64


def test_lm_right_padding_does_not_change_a_sentence():
    model = build_lm("lstm", 2, 0.5).double().eval()
    sents = sentences((6, 2, 4), TGT_V, seed=3)
    batch = collate_tokens(sents, PAD, left_pad=False)
    with torch.no_grad():
        out = model(batch)[0]
        for i, s in enumerate(sents):
            assert max_diff(out[i, : len(s)], model(s.unsqueeze(0))[0][0]) < TOL64


# --------------------------------------------------------------------------- 4. gradients
GRAD_CASES = {
    "rnnsearch-k1-tied": lambda: build_mt("lstm", 1, 0.0, tied=True, dropout=0.2),
    "rnnsearch-k1-untied": lambda: build_mt("lstm", 1, 0.0, tied=False, dropout=0.2),
    "rnnsearch-k4-r0.5-tied": lambda: build_mt("lstm", 4, 0.5, tied=True, dropout=0.2),
    "rnnsearch-k4-r0.5-untied": lambda: build_mt("lstm", 4, 0.5, tied=False, dropout=0.2),
    "rnnsearch-gru-k4-r0.5": lambda: build_mt("gru", 4, 0.5, tied=False, dropout=0.2),
    "rnnsearch-k2-r1-share-all": lambda: build_mt("lstm", 2, 1.0, share_all=True, dropout=0.2),
    "lm-lstm-k2": lambda: build_lm("lstm", 2, 0.0, dropout=0.2),
    "lm-lstm-k4-r0.5-tied": lambda: build_lm("lstm", 4, 0.5, tied=True, dropout=0.2),
    "lm-gru-r0.5-proj": lambda: build_lm("gru", 1, 0.5, out_dim=12, dropout=0.2),
    "lm-rnn-r0.5-tied": lambda: build_lm("rnn", 1, 0.5, tied=True, dropout=0.2),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_every_parameter_gets_a_gradient(case):
    """DDP's default (find_unused_parameters=False) needs a gradient for every parameter."""
    model = GRAD_CASES[case]().train()
    tgt = collate_tokens(sentences((5, 3, 6), TGT_V if "share-all" not in case else SRC_V, 7),
                         PAD, left_pad=False)
    prev = torch.cat([torch.full((3, 1), EOS), tgt[:, :-1]], 1)
    if case.startswith("lm"):
        logits = model(prev)[0]
    else:
        _, src, lengths = source_batch((7, 2, 4))
        logits = model(src, lengths, prev)[0]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                           ignore_index=PAD)
    loss.backward()
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient: {missing}"
    zero = [n for n, p in params.items() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradient: {zero}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())


@pytest.fixture(params=["ops", "fused"])
def cpu_attention_path(request, monkeypatch):
    """Both CPU paths of the attention: PyTorch's ops (GRNN_CPU_ATTENTION=0) and the C++
    kernels (kernels/attention_cpu.cpp, the default)."""
    from grnn_fairseq.attention import fused
    from grnn_fairseq.kernels import cpu_attention

    monkeypatch.delenv("GRNN_BACKEND", raising=False)
    monkeypatch.setitem(cpu_attention.VARIANT, "attention", str(int(request.param == "fused")))
    assert (fused(torch.zeros(1, 1, 1)) is cpu_attention) == (request.param == "fused")
    return request.param


def test_attention_matches_bahdanau_with_gradients(cpu_attention_path):
    """The sigmoid form of the energies (or the C++ kernels) gives Bahdanau's weights,
    context and gradients: compared with the literal e_ij = v^T tanh(W s + U h_j) in
    float64, with padding."""
    torch.manual_seed(0)
    att = AdditiveAttention(7, 6, 5).double()
    keys = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    query = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[True, False, False], [True, True, False], [False, False, False],
                        [False, False, False]])
    probe_c, probe_w = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)

    def literal():
        e = (torch.tanh(keys + att.query_proj(query)) @ att.score.weight[0]).masked_fill(pad, -math.inf)
        w = torch.softmax(e, 0)                                        # [S, B]
        return (w.unsqueeze(-1) * values).sum(0), w.t()

    results = []
    for fn in (lambda: att(query, keys, values, pad), literal):
        for t in (keys, values, query, *att.parameters()):
            t.grad = None
        context, weights = fn()
        ((context * probe_c).sum() + (weights * probe_w).sum()).backward()
        grads = [t.grad.clone() for t in (keys, values, query, att.query_proj.weight,
                                          att.query_proj.bias, att.score.weight)]
        results.append([context.detach(), weights.detach()] + grads)
    for got, want in zip(*results):
        assert max_diff(got, want) < 1e-12


@pytest.mark.parametrize("rows", [1, 2])
def test_attention_sequence_values_give_the_same_gradients(rows, cpu_attention_path):
    """Attention at several positions over the same values (RNNSearch's decoder in
    training), with ``sequence_values``: the values' gradient, computed once for all
    positions, is that of attending at each position separately (float64, padding,
    ``rows`` query rows per source, and a gradient of the values from elsewhere too), as
    are the other gradients; a backward of the queries only (autograd.grad, retained
    graph) leaves nothing that the next backward would count again."""
    torch.manual_seed(0)
    att = AdditiveAttention(7, 6, 5).double()
    s, n, t = 4, 3, 5
    keys = torch.randn(s, n, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(s, n, 6, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(t, n * rows, 7, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[True, False, False], [True, True, False], [False, False, False],
                        [False, False, False]])
    probe = torch.randn(t, n * rows, 6, dtype=torch.float64)
    probe_v = torch.randn(s, n, 6, dtype=torch.float64)

    def loss(sequence):
        vals, grads = att.sequence_values(values) if sequence else (values, None)
        assert (grads is not None) == sequence
        contexts = torch.stack([att(q, keys, vals, pad, rows, grads)[0] for q in queries])
        return (contexts * probe).sum() + (vals * probe_v).sum()

    inputs = (keys, values, queries, att.query_proj.weight, att.query_proj.bias,
              att.score.weight)
    want = torch.autograd.grad(loss(False), inputs)
    total = loss(True)
    torch.autograd.grad(total, [queries], retain_graph=True)
    got = torch.autograd.grad(total, inputs, retain_graph=True)
    again = torch.autograd.grad(total, inputs)   # a second backward: each position once
    for a, b, c in zip(want, got, again):
        assert max_diff(a, b) < 1e-12 and max_diff(a, c) < 1e-12


def test_attention_sequence_projection_gives_the_same_gradients(monkeypatch,
                                                                cpu_attention_path):
    """The query projection at several positions with ``sequence_projection`` (dW and db
    once for all positions): the gradients of W, b and the queries are those of projecting
    at each position apart (float64, a gradient of W and b from elsewhere too, every
    position handed over); a backward of the queries only leaves nothing behind, and two
    full backwards through a retained graph give twice one."""
    import grnn_fairseq.attention as attention

    handed = []
    real = attention.ProjectionGrads.__init__
    monkeypatch.setattr(attention.ProjectionGrads, "__init__",
                        lambda self: real(self) or handed.append(self))
    torch.manual_seed(0)
    att = AdditiveAttention(7, 6, 5).double()
    s, n, t = 4, 3, 5
    keys = torch.randn(s, n, 5, dtype=torch.float64)
    values = torch.randn(s, n, 6, dtype=torch.float64)
    queries = torch.randn(t, n, 7, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(t, n, 6, dtype=torch.float64)
    weight, bias = att.query_proj.weight, att.query_proj.bias

    def loss(sequence):
        proj = att.sequence_projection() if sequence else None
        w, b = (weight, bias) if proj is None else proj[:2]
        contexts = torch.stack([att(q, keys, values, None, 1, projection=proj)[0]
                                for q in queries])
        return (contexts * probe).sum() + w.pow(2).sum() + b.sin().sum()

    inputs = (weight, bias, queries)
    want = torch.autograd.grad(loss(False), inputs)
    total = loss(True)
    torch.autograd.grad(total, [queries], retain_graph=True)
    assert not handed[0].d_out  # nothing handed over for a backward of the queries only
    got = torch.autograd.grad(total, inputs, retain_graph=True)
    for a, b in zip(want, got):
        assert max_diff(a, b) < 1e-12
    total.backward(retain_graph=True)
    total.backward()
    for x, g in zip(inputs, got):
        assert max_diff(x.grad, 2 * g) < 1e-12
    assert att.sequence_projection() is not None
    with torch.no_grad():
        assert att.sequence_projection() is None


def test_attention_sequence_projection_under_autocast():
    """Under autocast the projection's W and b are cast once for the sequence; the
    queries and the parameters' gradients keep their dtypes and agree with F.linear's."""
    torch.manual_seed(0)
    att = AdditiveAttention(8, 6, 4)
    keys, values = torch.randn(3, 2, 4), torch.randn(3, 2, 6)
    queries = torch.randn(3, 2, 8, requires_grad=True)
    results = []
    for sequence in (False, True):
        att.zero_grad()
        queries.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            proj = att.sequence_projection() if sequence else None
            if sequence:
                assert proj[0].dtype == proj[1].dtype == torch.bfloat16
            out = torch.stack([att(q, keys, values, None, 1, projection=proj)[0]
                               for q in queries])
        out.float().pow(2).sum().backward()
        results.append([att.query_proj.weight.grad, att.query_proj.bias.grad, queries.grad])
    for want, got in zip(*results):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)


def test_rnnsearch_trains_with_sequence_values(monkeypatch):
    """RNNSearch's decoder in training hands every position's attention to
    ``sequence_values`` and its query projection to ``sequence_projection``, and gets the
    gradients of attending at each position apart.  PyTorch's ops (GRNN_CPU_ATTENTION=0):
    the C++ kernels hand over on their own (tests/test_attention_cpu.py)."""
    import grnn_fairseq.attention as attention
    from grnn_fairseq.kernels import cpu_attention

    monkeypatch.setitem(cpu_attention.VARIANT, "attention", "0")
    _, src, lengths = source_batch()
    prev = prev_tokens(src.shape[0], 6)
    calls, results = [], []
    for fn in (attention._HandOver, attention._Projection):
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply: calls.append(1) or real(*a))
    for sequence in (True, False):
        if not sequence:
            monkeypatch.setattr(AdditiveAttention, "sequence_values",
                                staticmethod(lambda values: (values, None)))
            monkeypatch.setattr(AdditiveAttention, "sequence_projection", lambda self: None)
        model = build_mt(cell="gru", groups=2, rate=0.5).double()
        logits, _ = model(src, lengths, prev)
        torch.log_softmax(logits, -1).sum().backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 2 * 6  # every target position, with the sequence's sums only
    assert results[0].keys() == results[1].keys()
    for name, grad in results[1].items():
        assert max_diff(results[0][name], grad) < 1e-10, name


# --------------------------------------------------------------------------- --retain-dropout
RETAIN_CASES = {
    "rnnsearch-lstm-k2": (lambda: build_mt("lstm", 2, 0.0, dropout=0.3),
                          ("RNNSearchEncoder", "RNNSearchDecoder")),
    "rnnsearch-gru-r0.5": (lambda: build_mt("gru", 1, 0.5, dropout=0.3),
                           ("RNNSearchEncoder", "RNNSearchDecoder")),
    "lm-lstm-k2": (lambda: build_lm("lstm", 2, 0.0, dropout=0.3), ("RecurrentLMDecoder",)),
}


@pytest.mark.parametrize("case", list(RETAIN_CASES))
def test_retain_dropout_keeps_training_dropout_at_inference(case):
    """fairseq-generate --retain-dropout (make_generation_fast_ with retain_dropout) keeps
    every dropout on in the eval model: with the same seed it gives exactly the training-mode
    forward (the same masks), and --retain-dropout-modules selects by module class name as
    fairseq's own models do (FairseqDropout). Silently ignoring it gave deterministic output."""
    build_model, names = RETAIN_CASES[case]
    if case.startswith("lm"):
        inputs = (prev_tokens(3, 6),)
    else:
        _, src, lengths = source_batch((7, 2, 4))
        inputs = (src, lengths, prev_tokens(3, 6))

    def forward(model, seed=0):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(*inputs)[0]

    train = build_model().train()  # the reference: training mode, same weights, same seed
    plain = build_model().eval()
    expected, deterministic = forward(train), forward(plain)
    assert not torch.equal(expected, deterministic)

    kept = build_model()
    kept.make_generation_fast_(retain_dropout=True)  # what --retain-dropout does
    assert not kept.training
    assert torch.equal(forward(kept), expected)
    assert not torch.equal(forward(kept, seed=1), forward(kept, seed=0))

    named = build_model()
    named.make_generation_fast_(retain_dropout=True, retain_dropout_modules=list(names))
    assert torch.equal(forward(named), expected)
    other = build_model()
    other.make_generation_fast_(retain_dropout=True, retain_dropout_modules=["LSTMDecoder"])
    assert torch.equal(forward(other), deterministic)


# --------------------------------------------------------------------------- 5. fp16 / bf16
def test_attention_mask_exact_in_half_precision():
    """The mask uses -inf (exact in every float type): no overflow, pads get weight 0."""
    torch.manual_seed(0)
    att = AdditiveAttention(8, 6, 5)
    keys, values = torch.randn(4, 3, 5) * 50, torch.randn(4, 3, 6)
    query = torch.randn(3, 8) * 50
    pad = torch.tensor([[True, False, False], [True, True, False], [False, False, False],
                        [False, False, False]])
    for dtype in (torch.float16, torch.bfloat16):
        a = copy.deepcopy(att).to(dtype)
        context, weights = a(query.to(dtype), keys.to(dtype), values.to(dtype), pad)
        assert context.dtype == dtype and torch.isfinite(context).all()
        assert torch.isfinite(weights).all()
        assert (weights.t()[pad] == 0).all()
        assert torch.allclose(weights.float().sum(1), torch.ones(3), atol=1e-2)


def _reduced(model, dtype):
    try:
        return copy.deepcopy(model).to(dtype)
    except RuntimeError as err:  # pragma: no cover
        pytest.skip(f"{dtype} unsupported here: {err}")


def _run_or_skip(fn, dtype):
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as err:
        if dtype == torch.float16 and "not implemented" in str(err).lower():
            pytest.skip(f"this CPU build has no float16 kernel: {err}")
        raise


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnnsearch_reduced_precision(dtype, cell):
    model = build_mt(cell, 2, 0.5).float().eval()
    _, src, lengths = source_batch((7, 2, 5, 1))
    prev = prev_tokens(4, 5)
    low = _reduced(model, dtype)
    with torch.no_grad():
        ref, ref_extra = model(src, lengths, prev)
        out, extra = _run_or_skip(lambda: low(src, lengths, prev), dtype)
        # incremental path in reduced precision too (what generation runs)
        step = _run_or_skip(lambda: incremental(
            low.decoder, prev, encoder_out=low.encoder(src, src_lengths=lengths))[0], dtype)
    assert out.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(step).all()
    attn = extra["attn"][0]
    assert torch.isfinite(attn).all()
    assert (attn.transpose(1, 2)[src.eq(PAD)] == 0).all()  # padded sources get no weight
    scale = ref.abs().max().item()
    assert max_diff(out, ref) < 0.03 * scale + 0.02
    assert max_diff(step, out) < 0.03 * scale + 0.02


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnnsearch_under_autocast(cell):
    """fp32 weights, autocast on (what fairseq's --amp does, here on the CPU in bf16):
    the forward, the backward and incremental decoding run and stay close to fp32."""
    model = build_mt(cell, 2, 0.5).float().train()
    model.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
    _, src, lengths = source_batch((7, 2, 5, 1))
    prev = prev_tokens(4, 5)
    ref = model(src, lengths, prev)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(src, lengths, prev)[0]
    out.float().sum().backward()
    scale = ref.abs().max().item()
    assert torch.isfinite(out.float()).all() and max_diff(out, ref) < 0.03 * scale + 0.02
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        step = incremental(model.decoder, prev, encoder_out=model.encoder(src, src_lengths=lengths))[0]
    assert torch.isfinite(step.float()).all() and max_diff(step, ref) < 0.03 * scale + 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lm_reduced_precision(dtype):
    model = build_lm("lstm", 2, 0.5, out_dim=12).float().eval()
    batch = collate_tokens(sentences((6, 2, 4), TGT_V, seed=3), PAD, left_pad=False)
    low = _reduced(model, dtype)
    with torch.no_grad():
        ref = model(batch)[0]
        out = _run_or_skip(lambda: low(batch)[0], dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max_diff(out, ref) < 0.03 * ref.abs().max().item() + 0.02


# --------------------------------------------------------------------------- 6. registry, errors
RNNSEARCH_ARCHS = (
    ["rnnsearch", "restricted_rnnsearch", "rnnsearch_wmt_en_de", "restricted_rnnsearch_wmt_en_de",
     "rnnsearch_gigaword", "restricted_rnnsearch_gigaword"]
    + [f"group_rnnsearch{s}_k{k}" for s in ("", "_gigaword") for k in (2, 4, 8, 16)]
    + [f"group_rnnsearch_wmt_en_de_k{k}" for k in (2, 4, 8)]  # 16 does not divide 1,000
)
LM_ARCHS = ["group_lstm_lm", "group_lstm_lm_k1", "group_lstm_lm_k2", "group_lstm_lm_k4",
            "restricted_lm", "restricted_rnn_lm", "restricted_gru_lm", "restricted_lstm_lm"]


def test_registry_maps_every_arch_to_our_models():
    for arch in RNNSEARCH_ARCHS + LM_ARCHS:
        cls = RNNSearchModel if arch in RNNSEARCH_ARCHS else RecurrentLanguageModel
        assert ARCH_MODEL_REGISTRY[arch] is cls, arch
        assert ARCH_MODEL_NAME_REGISTRY[arch] in ("grnn_rnnsearch", "grnn_lm")
        assert ARCH_CONFIG_REGISTRY[arch].__module__.startswith("grnn_fairseq."), arch
    assert MODEL_REGISTRY["grnn_rnnsearch"] is RNNSearchModel
    assert MODEL_REGISTRY["grnn_lm"] is RecurrentLanguageModel
    ours = {a for a, m in ARCH_MODEL_REGISTRY.items() if m.__module__.startswith("grnn_fairseq")}
    assert ours == set(RNNSEARCH_ARCHS + LM_ARCHS), "unexpected registered architectures"


def test_no_clash_with_fairseq_names():
    """fairseq's own models and archs keep their classes (we registered new names only)."""
    fairseq_models = {n: m for n, m in MODEL_REGISTRY.items()
                      if not m.__module__.startswith("grnn")}
    assert "lstm" in fairseq_models and "transformer" in fairseq_models
    assert ARCH_MODEL_REGISTRY["lstm"].__module__.startswith("fairseq.")
    assert ARCH_MODEL_REGISTRY["lstm_lm"].__module__.startswith("fairseq.")
    for arch, model in ARCH_MODEL_REGISTRY.items():
        if arch not in RNNSEARCH_ARCHS + LM_ARCHS:
            assert not model.__module__.startswith("grnn_fairseq"), arch
            assert not ARCH_CONFIG_REGISTRY[arch].__module__.startswith("grnn_fairseq"), arch


@pytest.mark.parametrize("arch", ["rnnsearch", "group_rnnsearch_k4",
                                  "restricted_rnnsearch_gigaword", "group_lstm_lm_k4",
                                  "restricted_gru_lm"])
def test_named_architectures_build(arch):
    if arch in LM_ARCHS:
        model = build_architecture(arch, vocab=50, device="meta")
    else:
        model = build_architecture(arch, 60, 60, device="meta")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_every_registered_architecture_builds_with_its_defaults():
    """A registered name must train as the README lists it, without size overrides (a K
    that does not divide an arch's widths fails in build_model)."""
    for arch, model in ARCH_MODEL_REGISTRY.items():
        if model.__module__.startswith("grnn_fairseq"):
            vocab = dict(vocab=50) if model is RecurrentLanguageModel else dict(src_vocab=60, tgt_vocab=60)
            assert sum(p.numel() for p in build_architecture(arch, device="meta", **vocab).parameters()) > 0


def test_readme_architecture_table_lists_the_registered_architectures():
    """The README's table of architectures names exactly the registered ones."""
    import itertools
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = text.split("### Architectures", 1)[1].split("\n\n", 2)[1]
    listed = set()
    for name in re.findall(r"`([a-z0-9_{},]+)`", table):
        parts = re.split(r"\{([^}]*)\}", name)  # group_rnnsearch_k{2,4} -> both names
        options = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
        listed |= {"".join(c) for c in itertools.product(*options)}
    assert listed == set(RNNSEARCH_ARCHS + LM_ARCHS)


def test_rnnsearch_with_language_modeling_task_fails_naming_arch(tmp_path):
    (tmp_path / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(10)))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(tmp_path), "--task", "language_modeling", "--arch", "group_rnnsearch_k2"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    with pytest.raises(ValueError, match="--arch") as err:
        task.build_model(cfg.model)
    assert "translation" in str(err.value)


@pytest.mark.parametrize("arch,overrides,option", [
    ("group_rnnsearch_k2", ["--encoder-groups", "3"], "--encoder-groups"),
    ("group_rnnsearch_k2", ["--decoder-groups", "3"], "--decoder-groups"),
    ("restricted_rnnsearch", ["--sharing-rate", "1.5"], "--sharing-rate"),
    ("restricted_rnnsearch", ["--sharing-rate", "-0.1"], "--sharing-rate"),
    ("group_lstm_lm", ["--decoder-groups", "7"], "--decoder-groups"),
    ("restricted_lm", ["--sharing-rate", "1.5"], "--sharing-rate"),
    ("group_rnnsearch_k2", ["--dropout", "1"], "--dropout-embed=1.0"),  # --dropout sets all
    ("group_rnnsearch_k2", ["--dropout-out", "-0.1"], "--dropout-out"),
    ("restricted_lm", ["--dropout-hidden", "1.5"], "--dropout-hidden"),
    # the decoder's recurrent input is the embedding and the context, not the embedding alone
    ("group_rnnsearch_k2", ["--decoder-groups", "3"],
     r"does not divide the decoder input width \(--decoder-embed-dim \+ 2 x "
     r"--encoder-hidden-size\)=640"),
    # widths and depths below 1 (a zero attention width used to train, attending uniformly)
    ("rnnsearch", ["--attention-dim", "0"], "--attention-dim=0: must be a positive integer"),
    ("rnnsearch", ["--encoder-hidden-size", "0"], "--encoder-hidden-size=0: must be a positive"),
    ("rnnsearch", ["--decoder-layers", "0"], "--decoder-layers=0: must be a positive"),
    ("restricted_lm", ["--decoder-out-embed-dim", "-4"], "--decoder-out-embed-dim=-4: must be"),
    ("restricted_lm", ["--decoder-embed-dim", "0"], "--decoder-embed-dim=0: must be"),
    ("rnnsearch", ["--recurrent-init-range", "0"], "--recurrent-init-range=0.0: must be a positive"),
    ("group_lstm_lm", ["--recurrent-init-range", "-0.1"], "--recurrent-init-range=-0.1: must be"),
    ("restricted_rnnsearch", ["--recurrent-init-range", "nan"], "--recurrent-init-range=nan"),
])
def test_bad_options_name_the_option(arch, overrides, option):
    vocab = dict(vocab=40) if arch in LM_ARCHS else dict(src_vocab=40, tgt_vocab=40)
    with pytest.raises(ValueError, match=option):
        build_architecture(arch, overrides=overrides, device="meta", **vocab)


@pytest.mark.parametrize("arch,vocab", [("group_rnnsearch_k4", dict(src_vocab=40, tgt_vocab=40)),
                                        ("restricted_rnnsearch", dict(src_vocab=40, tgt_vocab=40)),
                                        ("group_lstm_lm_k2", dict(vocab=40))])
def test_recurrent_init_range_sets_the_recurrent_layers_only(arch, vocab):
    """--recurrent-init-range R draws every recurrent tensor (encoder and decoder, groups
    or restricted pool) from U(-R, R); embeddings, attention and readout keep their init."""
    def build(*overrides):
        torch.manual_seed(0)
        return dict(build_architecture(arch, overrides=list(overrides), device="cpu",
                                       **vocab).named_parameters())

    default, small = build(), build("--recurrent-init-range", "0.001")
    recurrent = [n for n in default if ".rnn." in n]
    assert recurrent and len(recurrent) < len(default)
    for name in default:
        top = small[name].detach().abs().max().item()
        if name in recurrent:
            assert top <= 0.001, (name, top)
        else:
            assert top == default[name].detach().abs().max().item(), name
            assert top > 0.001 or not top, name


def _yaml_model_section(arch, **options):
    """The model section fairseq-hydra-train hands to fairseq.models.build_model: a
    DictConfig with _name and the options written in the YAML file, nothing else."""
    from omegaconf import OmegaConf

    return OmegaConf.create({"_name": arch, **options})


def test_yaml_model_sections_of_every_arch_pass_the_option_check():
    """fairseq fills a YAML model section with the arch defaults before build_model: every
    name an architecture function sets must be one of the model's own options."""
    from omegaconf import open_dict

    from grnn_fairseq.models.common import check_option_names

    for arch in RNNSEARCH_ARCHS + LM_ARCHS:
        cfg = _yaml_model_section(arch)
        with open_dict(cfg):
            ARCH_CONFIG_REGISTRY[arch](cfg)
        assert len(cfg) > 5, arch
        check_option_names(ARCH_MODEL_REGISTRY[arch], cfg)


@pytest.mark.parametrize("arch,good,value,typo,hint", [
    ("group_rnnsearch_k2", "encoder_groups", 4, "encoder_group", "encoder_groups"),
    ("restricted_lm", "sharing_rate", 0.25, "shareing_rate", "sharing_rate"),
])
def test_yaml_model_section_typo_is_an_error(arch, good, value, typo, hint):
    """fairseq passes a legacy model's YAML section unchecked; a misspelled option must
    stop the build (naming the closest option), not silently train the default.  The
    correctly spelled option builds what the same command-line option builds."""
    from fairseq.models import build_model

    small = dict(decoder_embed_dim=16, decoder_hidden_size=16, decoder_layers=1)
    if arch in RNNSEARCH_ARCHS:
        small.update(encoder_embed_dim=16, encoder_hidden_size=16, encoder_layers=1,
                     decoder_out_embed_dim=16, attention_dim=16)
        src, tgt = make_dict(SRC_V), make_dict(TGT_V)
        task = SimpleNamespace(src_dict=src, source_dictionary=src, target_dictionary=tgt)
        vocab = dict(src_vocab=SRC_V, tgt_vocab=TGT_V)
    else:
        task = SimpleNamespace(target_dictionary=make_dict(TGT_V))
        vocab = dict(vocab=TGT_V)

    def count(model):
        return sum(p.numel() for p in model.parameters())

    def cli(**options):
        flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        return count(build_architecture(arch, overrides=flags, device="meta", **vocab))

    built = count(build_model(_yaml_model_section(arch, **small, **{good: value}), task))
    assert built == cli(**small, **{good: value}) != cli(**small)
    with pytest.raises(ValueError, match=f"'{typo}' \\(did you mean '{hint}'\\?\\)"):
        build_model(_yaml_model_section(arch, **small, **{typo: value}), task)


def test_decoder_gathers_restricted_weights_once_per_forward(monkeypatch):
    """The decoder's time loop reuses the assembled restricted weights of every layer."""
    from grnn_fairseq.params import build_architecture
    from grnn_fairseq.restricted import RestrictedWeights

    model = build_architecture("restricted_rnnsearch", 30, 30, device="cpu", overrides=[
        "--encoder-embed-dim", "8", "--decoder-embed-dim", "8", "--encoder-hidden-size", "8",
        "--decoder-hidden-size", "8", "--attention-dim", "8"])
    calls = []
    orig = RestrictedWeights.forward
    monkeypatch.setattr(RestrictedWeights, "forward", lambda self: calls.append(1) or orig(self))
    src = torch.randint(4, 30, (2, 5))
    prev = torch.randint(4, 30, (2, 9))
    model(src, torch.tensor([5, 5]), prev)
    enc = 2 * 2  # 2 encoder layers x 2 directions, once each
    dec = 2      # 2 decoder layers, once for all 9 steps
    assert len(calls) == enc + dec


def test_language_model_with_a_translation_task_fails_naming_arch():
    """An LM arch under --task translation (or an LM checkpoint given to fairseq-generate /
    fairseq-interactive on translation data) would build over the target dictionary:
    training failed deep in fairseq, generation printed unconditioned LM samples."""
    from grnn_fairseq.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--arch=test: a language model .* no source side: "
                       r"use --task language_modeling"):
        build(RecurrentLanguageModel, LM_TINY, make_dict(SRC_V), make_dict(TGT_V))


def test_checkpoint_with_other_recurrent_parameters_names_the_cause():
    """Standard and restricted cells (--sharing-rate 0 / > 0) and stacks of other depths have
    other parameter names: refused with the option, not torch's "Missing key(s)"."""
    from grnn_fairseq.errors import ConfigError

    standard = build_mt().state_dict()
    with pytest.raises(ConfigError, match=r"does not fit this model: it has \S+\.rnn\..* "
                       r"that this model lacks; it lacks .*its recurrent layers are standard "
                       r"\(--sharing-rate 0\) and this model's restricted"):
        build_mt(rate=0.5).load_state_dict(standard)
    with pytest.raises(ConfigError, match=r"are restricted \(--sharing-rate > 0\) and this "
                       r"model's standard"):
        build_mt().load_state_dict(build_mt(rate=0.5).state_dict())
    # a rate too small for one shared row (round(0.01 * 16) = 0) is still a restricted cell
    with pytest.raises(ConfigError, match=r"are restricted \(--sharing-rate > 0\) and this "
                       r"model's standard"):
        build_mt().load_state_dict(build_mt(rate=0.01).state_dict())
    deeper = build(RecurrentLanguageModel, LM_TINY + ["--decoder-layers", "3"], None,
                   make_dict(TGT_V))
    with pytest.raises(ConfigError, match=r"it lacks decoder\.rnn\.layers\.2\..*other model "
                       r"options \(layers"):
        deeper.load_state_dict(build_lm().state_dict())
    # strict=False (fairseq's loads that allow it) is left to torch, as before
    deeper.load_state_dict(build_lm().state_dict(), strict=False)


def test_checkpoint_that_does_not_fit_names_the_cause():
    """A checkpoint of other shapes is refused with what to do: another dictionary (the
    embedding rows) or other model options (here the groups); torch alone says only "size
    mismatch".  A fitting one loads."""
    from grnn_fairseq.errors import ConfigError

    k2 = build_mt(groups=2)
    build_mt(groups=2, seed=1).load_state_dict(k2.state_dict())
    with pytest.raises(ConfigError, match=r"encoder\.rnn\.layers\.0\.directions\.0\.weight_ih "
                       r"is \[2, 32, 8\] in the checkpoint and \[4, 16, 4\] here.*other model "
                       r"options \(groups"):
        build_mt(groups=4).load_state_dict(k2.state_dict())
    other = build(RNNSearchModel, MT_TINY + ["--share-decoder-input-output-embed"],
                  make_dict(SRC_V), make_dict(TGT_V + 5))
    with pytest.raises(ConfigError, match=rf"its dictionaries have \[{TGT_V}\] entries, this "
                       rf"data's \[{SRC_V}, {TGT_V + 5}\]: use the data folder"):
        other.load_state_dict(build_mt().state_dict())
    lm = build_lm(tied=True)
    bigger = build(RecurrentLanguageModel, LM_TINY + ["--share-decoder-input-output-embed"],
                   None, make_dict(TGT_V + 1))
    with pytest.raises(ConfigError, match=rf"its dictionaries have \[{TGT_V}\] entries"):
        bigger.load_state_dict(lm.state_dict())
