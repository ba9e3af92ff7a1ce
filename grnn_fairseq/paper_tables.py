"""The papers' parameter tables, with the vocabularies assumed, reproduced by our counts.

    python -m grnn_fairseq.params --tables
"""
from .params import build_architecture, count_parameters, millions, paper_rnn_count

# Diao et al. 2019, Table II: "RNN parameters (M)" of the PTB language model
# (10,000 words, embedding 200, 3 layers of 200 units), per sharing rate r.
TABLE2_RATES = (1, 0.95, 0.9, 0.7, 0.5, 0.3, 0.1, 0)
TABLE2 = {
    "rnn": ("0.130", "0.136", "0.142", "0.167", "0.191", "0.215", "0.239", "0.251"),
    "gru": ("0.130", "0.161", "0.191", "0.311", "0.432", "0.553", "0.673", "0.733"),
    "lstm": ("0.130", "0.173", "0.215", "0.384", "0.553", "0.721", "0.890", "0.975"),
}
PTB_VOCAB = 10000

# Gao et al. 2018: total parameters (M) per number of groups K, and the dictionaries we
# assume (IWSLT14 as fairseq's recipe builds it; joined sentencepiece for WMT / Gigaword).
GROUP_RNN = {
    "iwslt": {"vocab": (8848, 6632), "arch": {1: "rnnsearch", 2: "group_rnnsearch_k2",
              4: "group_rnnsearch_k4", 8: "group_rnnsearch_k8", 16: "group_rnnsearch_k16"},
              "paper": {1: 6.0, 2: 4.3, 4: 3.4, 8: 3.0, 16: 2.7}},
    "wmt_en_de": {"vocab": (40000, 40000), "arch": {2: "group_rnnsearch_wmt_en_de_k2",
                  4: "group_rnnsearch_wmt_en_de_k4"}, "paper": {2: 111, 4: 78}},
    "gigaword": {"vocab": (30000, 30000), "arch": {1: "rnnsearch_gigaword",
                 2: "group_rnnsearch_gigaword_k2", 4: "group_rnnsearch_gigaword_k4",
                 8: "group_rnnsearch_gigaword_k8", 16: "group_rnnsearch_gigaword_k16"},
                 "paper": {1: 24.1, 2: 17.0, 4: 13.5, 8: 11.8, 16: 10.9}},
    # PTB large LM, 2 x 1500, untied embeddings: "LSTM 66M, 2 Group LSTM 48M"
    "ptb_lm": {"vocab": PTB_VOCAB, "arch": {1: "group_lstm_lm_k1", 2: "group_lstm_lm_k2"},
               "paper": {1: 66, 2: 48}},
}


def table2_rows():
    """-> [(cell, r, true recurrent count, paper-convention count, published)]"""
    rows = []
    for cell, published in TABLE2.items():
        for r, pub in zip(TABLE2_RATES, published):
            m = build_architecture(f"restricted_{cell}_lm", vocab=PTB_VOCAB,
                                   overrides=["--sharing-rate", str(r)])
            rows.append((cell, r, count_parameters(m)["recurrent"], paper_rnn_count(m), pub))
    return rows


def group_rnn_rows():
    """-> [(dataset, K, arch, our total, published millions)]"""
    rows = []
    for data, spec in GROUP_RNN.items():
        for k, arch in spec["arch"].items():
            v = spec["vocab"]
            kw = {"vocab": v} if isinstance(v, int) else {"src_vocab": v[0], "tgt_vocab": v[1]}
            rows.append((data, k, arch, count_parameters(build_architecture(arch, **kw))["total"],
                         spec["paper"][k]))
    return rows


def print_tables():
    print("Gao et al. 2018 (group RNNs): total parameters")
    print("| dataset | vocab | K | arch | ours | ours (M) | paper (M) | diff |")
    print("|---|---|---|---|---|---|---|---|")
    for data, k, arch, n, pub in group_rnn_rows():
        print(f"| {data} | {GROUP_RNN[data]['vocab']} | {k} | `{arch}` | {n:,d} | {millions(n, 2)} "
              f"| {pub} | {100 * (n / 1e6 - pub) / pub:+.1f}% |")
    print()
    print("Diao et al. 2019, Table II (restricted RNNs): RNN parameters (M), PTB 3 x 200")
    print("| cell | r | true count | paper convention | published |")
    print("|---|---|---|---|---|")
    for cell, r, true, paper, pub in table2_rows():
        print(f"| {cell} | {r} | {true:,d} ({millions(true)}) | {paper:,d} ({millions(paper)}) | {pub} |")
