"""Exact parameter counts against hand-computed formulas and the papers' tables."""
import subprocess
import sys

import pytest
import torch

from grnn_fairseq.paper_tables import GROUP_RNN, TABLE2, TABLE2_RATES, group_rnn_rows, table2_rows
from grnn_fairseq.params import build_architecture, count_parameters, millions
from grnn_fairseq.recurrent import RecurrentStack, count_weights

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def test_table2_every_cell_in_both_conventions():
    """Diao et al. 2019, Table II.  True count: per layer the pool has round(200 r) shared
    rows and 2 G (200 - round(200 r)) private rows, each with 200 weights and 1 bias.  The
    published figure adds V - E = 9,800 (the authors' subtraction of (V+1)*E for a decoder
    that has V*H + V parameters); it is printed with half-up rounding."""
    rows = table2_rows()
    assert len(rows) == 24
    for cell, r, true, paper, published in rows:
        s = round(200 * r)
        by_hand = 3 * (s + 2 * GATES[cell] * (200 - s)) * (200 + 1)
        assert true == by_hand, (cell, r)
        assert paper == by_hand + 10000 - 200, (cell, r)
        assert millions(paper) == published, (cell, r)
    # the true count, rounded the same way, misses the published column: both are needed
    assert sum(millions(true) != pub for _, _, true, _, pub in rows) == 24


def test_half_up_rounding_matters_on_ties():
    assert millions(552_500) == "0.553"  # RGRU r=0.3, RLSTM r=0.5: round() would give 0.552
    assert f"{552_500 / 1e6:.3f}" == "0.552"


def test_group_rnn_ptb_language_model_66m_and_48m():
    """Gao et al. 2018, PTB: 2 x 1500 LSTM, 10k words, untied: 66M (K=1) and 48M (K=2)."""
    v, h = 10000, 1500
    emb_and_softmax = v * h + h * v + v
    lstm_layer = 4 * h * (h + h) + 2 * 4 * h
    group_layer = 2 * (4 * (h // 2) * (h // 2 + h // 2) + 2 * 4 * (h // 2))
    for k, by_hand in [(1, emb_and_softmax + 2 * lstm_layer), (2, emb_and_softmax + 2 * group_layer)]:
        n = count_parameters(build_architecture(f"group_lstm_lm_k{k}", vocab=v))["total"]
        assert n == by_hand
        assert millions(n, 1) == {1: "66.0", 2: "48.0"}[k]


@pytest.mark.parametrize("row", group_rnn_rows(), ids=lambda r: f"{r[0]}-k{r[1]}")
def test_rnnsearch_sizes_within_5_percent_of_paper(row):
    data, k, arch, n, published = row
    assert abs(n / 1e6 - published) / published <= 0.05, (arch, n, published)


def test_iwslt_rnnsearch_count_by_hand():
    """rnnsearch (IWSLT sizes) written out term by term."""
    sv, tv, e, h, a = 8848, 6632, 128, 256, 256
    lstm = lambda i, hh: 4 * hh * (i + hh) + 8 * hh  # noqa: E731
    enc = sv * e + 2 * lstm(e, h) + 2 * lstm(2 * h, h) + 2 * h * a + (2 * h * h + h)
    att = (h * a + a) + a
    dec = tv * e + lstm(e + 2 * h, h) + lstm(h, h)
    out = (h + e + 2 * h) * e + e + tv  # readout, tied projection weight, softmax bias
    n = count_parameters(build_architecture("rnnsearch", 8848, 6632))
    assert n["total"] == enc + att + dec + out


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("groups,rate,i,h,bi", [
    (1, 0.0, 6, 8, False), (2, 0.0, 6, 8, True), (4, 0.0, 12, 16, False), (1, 0.5, 6, 8, False),
    (2, 0.25, 10, 8, True), (1, 1.0, 8, 8, False), (4, 0.7, 16, 16, False),
])
def test_count_formulas_match_built_modules(cell, groups, rate, i, h, bi):
    stack = RecurrentStack(i, h, num_layers=2, cell=cell, groups=groups, sharing_rate=rate,
                           bidirectional=bi)
    d = 2 if bi else 1
    formula = d * (count_weights(i, h, cell, groups, rate) + count_weights(d * h, h, cell, groups, rate))
    assert formula == sum(p.numel() for p in stack.parameters())
    if rate == 0.0 and groups == 1:
        ref = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](
            i, h, num_layers=2, bidirectional=bi)
        assert formula == sum(p.numel() for p in ref.parameters())


def test_groups_divide_recurrent_weights_by_k():
    def weights_only(k):
        s = RecurrentStack(64, 64, num_layers=2, groups=k)
        return sum(p.numel() for n, p in s.named_parameters() if "weight" in n)
    for k in (2, 4, 8):
        assert weights_only(1) == k * weights_only(k)


def test_breakdown_adds_up_and_counts_tied_weights_once():
    m = build_architecture("rnnsearch", 100, 80, overrides=["--encoder-hidden-size", "16",
                           "--decoder-hidden-size", "16", "--encoder-embed-dim", "8",
                           "--decoder-embed-dim", "8", "--attention-dim", "8"], device="cpu")
    c = count_parameters(m)
    assert c["total"] == sum(v for k, v in c.items() if k != "total")
    assert m.decoder.output_projection.weight is m.decoder.embed_tokens.weight
    assert c["total"] == sum(p.numel() for p in m.parameters())  # parameters() yields a tied one once
    assert c["output"] == (16 + 8 + 32) * 8 + 8 + 80  # readout + bias, tied weight, softmax bias


def test_params_command_prints_exact_total():
    out = subprocess.run([sys.executable, "-m", "grnn_fairseq.params", "--arch", "group_lstm_lm_k2",
                          "--vocab", "10000"], capture_output=True, text=True, check=True).stdout
    assert "48,034,000" in out
    out = subprocess.run([sys.executable, "-m", "grnn_fairseq.params", "--arch", "restricted_gru_lm",
                          "--vocab", "10000", "--sharing-rate", "0.3", "--paper-convention"],
                         capture_output=True, text=True, check=True).stdout
    assert "542,700" in out and "0.553M" in out
    out = subprocess.run([sys.executable, "-m", "grnn_fairseq.params", "--layer", "--input-size",
                          "200", "--hidden-size", "200", "--cell", "lstm", "--num-layers", "3",
                          "--sharing-rate", "0.5"], capture_output=True, text=True, check=True).stdout
    assert "542,700" in out


def test_params_command_rejects_unknown_arch():
    r = subprocess.run([sys.executable, "-m", "grnn_fairseq.params", "--arch", "nope", "--vocab", "10"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "'nope' is not registered" in r.stderr
    # fairseq's own architectures read the whole training namespace: refused with a
    # message, not a traceback from inside fairseq
    r = subprocess.run([sys.executable, "-m", "grnn_fairseq.params", "--arch",
                        "lstm_wiseman_iwslt_de_en", "--src-vocab", "10"], capture_output=True, text=True)
    assert r.returncode == 2 and "fairseq's own" in r.stderr and "Traceback" not in r.stderr
    # a language model counted with translation vocabularies used to count the target side
    # as its dictionary without a word
    r = subprocess.run([sys.executable, "-m", "grnn_fairseq.params", "--arch", "restricted_lm",
                        "--src-vocab", "100"], capture_output=True, text=True)
    assert r.returncode == 2 and "is a language model: give its dictionary size with " \
        "--vocab N" in r.stderr, r.stderr


def test_tied_architectures_can_be_untied_from_the_command_line():
    """IWSLT sizes tie the decoder embeddings; --no-share-... adds back exactly V_tgt x E."""
    tied = count_parameters(build_architecture("rnnsearch", 8848, 6632))["total"]
    untied = count_parameters(build_architecture(
        "rnnsearch", 8848, 6632, overrides=["--no-share-decoder-input-output-embed"]))["total"]
    assert untied - tied == 6632 * 128
    shared = count_parameters(build_architecture("rnnsearch_gigaword", 30000, 30000))["total"]
    separate = count_parameters(build_architecture(
        "rnnsearch_gigaword", 30000, 30000, overrides=["--no-share-all-embeddings"]))["total"]
    assert separate - shared == 2 * 30000 * 256  # a target embedding and an untied projection
