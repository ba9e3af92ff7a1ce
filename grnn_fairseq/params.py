"""Exact parameter accounting for layers and grnn-fairseq's architectures.

    python -m grnn_fairseq.params --arch group_rnnsearch_k4 --src-vocab 8848 --tgt-vocab 6632
    python -m grnn_fairseq.params --arch restricted_rnn_lm --vocab 10000 --sharing-rate 0.5
    python -m grnn_fairseq.params --layer --cell lstm --input-size 1024 --hidden-size 1024 --groups 4
    python -m grnn_fairseq.params --tables          # the papers' tables (README)

Models are built on PyTorch's ``meta`` device: no memory is allocated, so even the
WMT-sized models count in a second.  Counts are trainable parameters; tied weights count
once.  ``paper_rnn_count`` reproduces how Diao et al. (2019) counted Table II.
"""
import argparse
import sys
from decimal import ROUND_HALF_UP, Decimal
from types import SimpleNamespace

import torch

from .errors import ConfigError

CATEGORIES = ("embeddings", "recurrent", "attention", "output", "other")


def category(name):
    """Which part of a model a parameter belongs to, from its name."""
    if "embed_tokens" in name:
        return "embeddings"
    if ".rnn." in name or name.startswith("rnn."):
        return "recurrent"
    if "attention" in name:
        return "attention"
    if any(k in name for k in ("output_projection", "readout", "out_proj")):
        return "output"
    return "other"


def count_parameters(module):
    """-> {category: n, ..., "total": n} of trainable parameters (shared tensors once)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for name, p in module.named_parameters():
        if p.requires_grad:
            counts[category(name)] += p.numel()
    counts["total"] = sum(counts[c] for c in CATEGORIES)
    return counts


def _dictionary(size):
    from fairseq.data import Dictionary

    d = Dictionary()
    while len(d) < size:
        d.add_symbol(f"w{len(d)}")
    if len(d) != size:
        raise ConfigError(f"a fairseq dictionary has at least {len(d)} entries; got vocabulary {size}")
    return d


def build_architecture(arch, src_vocab=None, tgt_vocab=None, vocab=None, overrides=(), device="meta"):
    """Build one of grnn-fairseq's architectures with dictionaries of the given sizes."""
    import grnn_fairseq  # noqa: F401  (registers the models)
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY, FairseqLanguageModel

    ours = sorted(a for a, m in ARCH_MODEL_REGISTRY.items() if m.__module__.startswith("grnn_fairseq"))
    if arch not in ARCH_MODEL_REGISTRY:
        raise ConfigError(f"--arch {arch!r} is not registered; grnn-fairseq architectures: {ours}")
    if arch not in ours:  # fairseq's own models read options of the whole training namespace
        raise ConfigError(f"--arch {arch!r} is fairseq's own: this counts grnn-fairseq "
                          f"architectures ({ours}); count a model of fairseq's with "
                          f"count_parameters(model)")
    model_cls = ARCH_MODEL_REGISTRY[arch]
    if vocab is None and issubclass(model_cls, FairseqLanguageModel):
        raise ConfigError(f"--arch {arch!r} is a language model: give its dictionary size with "
                          f"--vocab N (--src-vocab/--tgt-vocab are for translation models)")
    parser = argparse.ArgumentParser(allow_abbrev=False)
    model_cls.add_args(parser)
    args = parser.parse_args(list(overrides))
    args.arch = arch
    ARCH_CONFIG_REGISTRY[arch](args)
    if vocab is not None:
        d = _dictionary(vocab)
        task = SimpleNamespace(source_dictionary=d, target_dictionary=d, dictionary=d)
    else:
        src, tgt = _dictionary(src_vocab), _dictionary(tgt_vocab or src_vocab)
        if getattr(args, "share_all_embeddings", False) and (tgt_vocab or src_vocab) == src_vocab:
            tgt = src
        task = SimpleNamespace(src_dict=src, tgt_dict=tgt, source_dictionary=src, target_dictionary=tgt)
    with torch.device(device):
        return model_cls.build_model(args, task)


def paper_rnn_count(model):
    """Table II convention of Diao et al. (2019), as their ``compute_num_param`` computes it:
    every module counted on its own (a tied output weight counted again), minus V*E for the
    embedding and minus (V+1)*E for the decoder.  With hidden size H = E this is the true
    recurrent count + V - E (the decoder is really V*H + V): 9,800 too many on PTB."""
    dec = model.decoder
    v, e = dec.embed_tokens.weight.shape
    per_module = sum(p.numel() for mod in model.modules() for p in mod.parameters(recurse=False))
    return per_module - v * e - (v + 1) * e


def millions(n, places=3):
    """Round half up, as the papers' tables do (Python's round() would round half to even)."""
    q = Decimal(1).scaleb(-places)
    return str((Decimal(n) / 10**6).quantize(q, rounding=ROUND_HALF_UP))


def print_counts(counts, out=sys.stdout):
    for c in CATEGORIES + ("total",):
        print(f"{c:>11}: {counts[c]:>12,d}  ({millions(counts[c], 2)}M)", file=out)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With --arch, every other option is passed to the model (e.g. --encoder-groups 4).")
    p.add_argument("--arch", help="a grnn-fairseq architecture (fairseq's own are refused)")
    p.add_argument("--src-vocab", type=int, help="source dictionary size (translation models)")
    p.add_argument("--tgt-vocab", type=int, help="target dictionary size (translation models)")
    p.add_argument("--vocab", type=int, help="dictionary size (language models)")
    p.add_argument("--paper-convention", action="store_true",
                   help="also print the RNN count as Diao et al. (2019) Table II counts it")
    p.add_argument("--layer", action="store_true",
                   help="count one recurrent stack (options: --cell --input-size --hidden-size "
                        "--num-layers --groups --sharing-rate --bidirectional)")
    p.add_argument("--tables", action="store_true", help="print the papers' parameter tables")
    args, rest = p.parse_known_args(argv)
    if args.tables:
        from .paper_tables import print_tables
        print_tables()
        return 0
    if args.layer:
        return _count_layer(rest)
    if not args.arch:
        p.error("give --arch, --layer or --tables")
    if args.vocab is None and args.src_vocab is None:
        p.error("give --vocab (language models) or --src-vocab/--tgt-vocab (translation models)")
    try:
        model = build_architecture(args.arch, args.src_vocab, args.tgt_vocab, args.vocab, rest)
    except ValueError as err:
        p.error(str(err))
    print(f"{args.arch} (vocab {args.vocab or (args.src_vocab, args.tgt_vocab or args.src_vocab)})")
    print_counts(count_parameters(model))
    if args.paper_convention:
        n = paper_rnn_count(model)
        print(f"Diao et al. Table II convention, RNN parameters: {n:,d} ({millions(n)}M)")
    return 0


def _count_layer(argv):
    from .recurrent import RecurrentStack

    p = argparse.ArgumentParser(prog="grnn-params --layer")
    p.add_argument("--cell", default="lstm")
    p.add_argument("--input-size", type=int, required=True)
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--sharing-rate", type=float, default=0.0)
    p.add_argument("--bidirectional", action="store_true")
    a = p.parse_args(argv)
    try:
        with torch.device("meta"):
            stack = RecurrentStack(a.input_size, a.hidden_size, a.num_layers, a.cell, a.groups,
                                   sharing_rate=a.sharing_rate, bidirectional=a.bidirectional)
    except ValueError as err:
        p.error(str(err))
    n = sum(q.numel() for q in stack.parameters())
    print(f"recurrent: {n:,d}  ({millions(n, 3)}M)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
