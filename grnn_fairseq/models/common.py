"""Options and helpers shared by the RNNSearch and language models."""
import argparse
import difflib

import torch
from torch import nn

from ..cells import GATES
from ..dropout import Dropout
from ..errors import ConfigError
from ..rearrangement import REARRANGEMENT_MODES


def add_dropout_args(parser, out_help):
    """--dropout and the three specific rates it defaults (embeddings, between layers, out)."""
    a = parser.add_argument
    a("--dropout", type=float, metavar="D", help="default of every dropout below")
    a("--dropout-embed", type=float, metavar="D", help="dropout on embeddings")
    a("--dropout-hidden", type=float, metavar="D", help="dropout between recurrent layers")
    a("--dropout-out", type=float, metavar="D", help=out_help)


def set_dropout_defaults(args, dropout):
    set_defaults(args, dropout=dropout)
    set_defaults(args, dropout_embed=args.dropout, dropout_hidden=args.dropout,
                 dropout_out=args.dropout)


def dropout_module(args, option, owner):
    """fairseq's dropout at the rate of ``--<option>``, named after its owner's class.

    A ``FairseqDropout`` (:class:`grnn_fairseq.dropout.Dropout`, faster on the CPU), not
    ``nn.Dropout``: fairseq-generate's ``--retain-dropout`` (and ``--retain-dropout-modules
    RNNSearchDecoder``, say) keeps it on in generation, which ``nn.Dropout`` would silently
    ignore."""
    p = getattr(args, option.replace("-", "_"))
    if not 0.0 <= p < 1.0:
        fail(option, p, "a dropout rate must be in [0, 1) (--dropout gives every rate not set)")
    return Dropout(p, module_name=type(owner).__name__)


def add_recurrent_args(parser, prefixes):
    """Recurrent options: cell, rearrangement, sharing rate, and per-part group counts."""
    parser.add_argument("--cell", choices=tuple(GATES), help="recurrent cell type")
    parser.add_argument("--rearrangement", choices=REARRANGEMENT_MODES,
                        help="representation rearrangement between layers and/or time steps")
    parser.add_argument("--sharing-rate", type=float, metavar="R",
                        help="restricted sharing rate r in [0, 1] of every recurrent layer")
    parser.add_argument("--recurrent-init-range", type=float, metavar="R",
                        help="draw the recurrent weights and biases from U(-R, R), the same "
                             "for every group count (default: U(-1/sqrt(m), 1/sqrt(m)), "
                             "m = hidden size / groups, PyTorch's init of one group's cell)")
    for prefix in prefixes:
        parser.add_argument(f"--{prefix}-groups", type=int, metavar="K",
                            help=f"number of groups of the {prefix} recurrent layers")


def embedding(num_embeddings, dim, padding_idx):
    emb = nn.Embedding(num_embeddings, dim, padding_idx=padding_idx)
    nn.init.uniform_(emb.weight, -0.1, 0.1)
    nn.init.constant_(emb.weight[padding_idx], 0)
    return emb


def linear(in_features, out_features, bias=True):
    lin = nn.Linear(in_features, out_features, bias=bias)
    nn.init.uniform_(lin.weight, -0.1, 0.1)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


def fail(option, value, message):
    """A configuration error that names the option, the value and the fix."""
    raise ConfigError(f"--{option}={value}: {message}")


def check_sizes(args, *options):
    """Every width and layer count named must be a positive integer: 0 or less fails deep in
    torch (a division by zero, a negative dimension), and a zero attention width even
    trains, with attention uniform over the source."""
    for option in options:
        value = getattr(args, option.replace("-", "_"))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(option, value, "must be a positive integer")


def check_recurrent_options(args, part, embed_dim, hidden_size, groups, input_name=None):
    """Validate one recurrent part's options with the option names a user typed.

    ``input_name``: what to call the input width in a message when it is not
    ``--{part}-embed-dim`` alone (RNNSearch's decoder reads its embedding and the
    attention context)."""
    from ..restricted import check_sharing_rate
    from ..weights import check_groups, check_init_range

    try:
        check_groups(groups, **{input_name or f"--{part}-embed-dim": embed_dim,
                                f"--{part}-hidden-size": hidden_size})
    except ValueError as err:
        fail(f"{part}-groups", groups, str(err))
    try:
        check_sharing_rate(args.sharing_rate)
    except ValueError as err:
        fail("sharing-rate", args.sharing_rate, str(err))
    init_range = getattr(args, "recurrent_init_range", None)
    try:
        check_init_range(init_range)
    except ValueError:
        fail("recurrent-init-range", init_range, "must be a positive number R (recurrent "
             "weights and biases from U(-R, R)); leave it unset for the default, "
             "U(-1/sqrt(m), 1/sqrt(m)) per group")


def set_defaults(args, **defaults):
    """Fill options the user left unset (None or absent); explicit values, 0 included, win."""
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def check_option_names(model_cls, cfg):
    """Reject misspelled options in a model-only YAML config (fairseq-hydra-train).

    fairseq hands a legacy (``add_args``) model's ``model:`` section to it unchecked, so a
    typo such as ``encoder_group: 4`` would silently train the default.  Command-line
    configs (and checkpoints written from them) hold the whole namespace, ``task``
    included, and argparse has already checked them; those pass untouched."""
    from omegaconf import DictConfig

    if not isinstance(cfg, DictConfig) or "task" in cfg:
        return
    parser = argparse.ArgumentParser(add_help=False)
    model_cls.add_args(parser)
    known = {action.dest for action in parser._actions} | {"_name", "arch"}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known - {"_name", "arch"}), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"model {cfg.get('_name', '?')}: unknown option(s) {', '.join(hints)} in the "
            f"model section of the config; the options are the --{{name}} flags of "
            f"`fairseq-train --user-dir grnn_fairseq --arch {cfg.get('_name', '...')} --help` "
            f"with '-' written '_'")


def check_tied_weights(model, state_dict):
    """Refuse a checkpoint that holds different tensors under names this model ties.

    With --share-decoder-input-output-embed / --share-all-embeddings one parameter has
    several names (decoder.embed_tokens.weight, decoder.output_projection.weight,
    encoder.embed_tokens.weight), and a checkpoint holds it under each of them.  torch's
    load_state_dict copies every name into the one tensor, the last silently winning: a
    checkpoint trained untied would load with its embeddings replaced by its output
    projection (--finetune-from-model, --restore-file, --model-overrides).  fairseq's own
    models name a tied output layer differently and fail with "Unexpected key(s)"."""
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in names.values():
        present = [n for n in group if n in state_dict]
        for name in present[1:]:
            first, other = state_dict[present[0]], state_dict[name]
            if (torch.is_tensor(first) and torch.is_tensor(other) and first.shape == other.shape
                    and not torch.equal(first, other)):
                raise ConfigError(
                    f"the checkpoint holds different weights for {present[0]} and {name}, which "
                    f"this model ties (one parameter): it was trained without the tying options "
                    f"this model has (--share-decoder-input-output-embed, --share-all-embeddings; "
                    f"the IWSLT-sized architectures tie the decoder by default). Load it with the "
                    f"options it was trained with (e.g. --no-share-decoder-input-output-embed, "
                    f"--no-share-all-embeddings)")


# what a checkpoint that does not fit this model's options needs
LOAD_AS_TRAINED = ("load it with the options it was trained with (none of them in "
                   "--model-overrides; for --finetune-from-model or --restore-file, the "
                   "training run's options, which the checkpoint keeps under cfg['model'])")


def check_checkpoint(model, state_dict, strict=True):
    """The checks of a checkpoint that name a cause a user can act on, before torch's
    load_state_dict (which names only tensors): its shapes, with ``strict`` its recurrent
    parameter names, and its tying.  Both models' ``load_state_dict`` call it."""
    own = model.state_dict()
    check_shapes(own, model, state_dict)
    if strict:
        check_keys(own, state_dict)
    check_tied_weights(model, state_dict)


def check_keys(own, state_dict):
    """Refuse a checkpoint whose recurrent layers have other parameters than this model's
    (standard cells and restricted ones have different names, and so do stacks of other
    depths): torch would say "Missing key(s) ... Unexpected key(s)" under a traceback."""
    given = {k for k in state_dict if torch.is_tensor(state_dict[k])}

    def recurrent(k):
        return ".rnn." in k and not k.endswith(".shuffles")  # saved since 2026-11-24 only

    def restricted(keys):  # RestrictedWeights' parameters: shared_* and private_*
        return any(k.rsplit(".", 1)[-1].startswith(("shared_", "private_")) for k in keys)

    missing = sorted(k for k in set(own) - given if recurrent(k))
    unexpected = sorted(k for k in given - set(own) if recurrent(k))
    if not (missing or unexpected):
        return
    shown = ([f"it has {_listed(unexpected)} that this model lacks"] if unexpected else []) + (
        [f"it lacks {_listed(missing)}"] if missing else [])
    theirs, ours = restricted(unexpected), restricted(missing)
    if theirs != ours:
        kind = {True: "restricted", False: "standard"}
        cause = (f"its recurrent layers are {kind[theirs]} (--sharing-rate "
                 f"{'> 0' if theirs else '0'}) and this model's {kind[ours]}")
    else:
        cause = "it was trained with other model options (layers, --cell or --sharing-rate)"
    raise ConfigError(f"the checkpoint does not fit this model: {'; '.join(shown)}; {cause}; "
                      f"{LOAD_AS_TRAINED}")


def check_shapes(own, model, state_dict):
    """Refuse a checkpoint whose tensors do not fit this model with the cause a user can act
    on: a dictionary other than the training data's (the embeddings' rows differ), or other
    model options.  torch would say only "size mismatch for <name>" under a traceback.
    ``own``: ``model.state_dict()``."""
    bad = [k for k, v in state_dict.items()
           if k in own and torch.is_tensor(v) and v.shape != own[k].shape]
    if not bad:
        return
    shown = _listed([f"{k} is {list(state_dict[k].shape)} in the checkpoint and "
                     f"{list(own[k].shape)} here" for k in bad], 3, "; ")
    parts = (getattr(model, "encoder", None), getattr(model, "decoder", None))
    vocab = {len(p.dictionary) for p in parts if getattr(p, "dictionary", None) is not None}
    if all(own[k].dim() and own[k].shape[0] in vocab
           and state_dict[k].shape[1:] == own[k].shape[1:] for k in bad):  # only vocab rows
        rows = sorted({state_dict[k].shape[0] for k in bad})
        cause = (f"its dictionaries have {rows} entries, this data's {sorted(vocab)}: use the "
                 f"data folder (its dict.*.txt) the model was trained with")
    else:
        cause = ("it was trained with other model options (groups, --cell, --sharing-rate, "
                 f"widths or layers); {LOAD_AS_TRAINED}")
    raise ConfigError(f"the checkpoint does not fit this model: {shown}; {cause}")


def _listed(items, n=2, sep=", "):
    """The first ``n`` items, and how many more."""
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return sep.join(items[:n]) + more
