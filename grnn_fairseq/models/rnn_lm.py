"""Recurrent language models: group LSTM LMs (Gao et al. 2018, PTB) and restricted
RNN / GRU / LSTM LMs (Diao et al. 2019, PTB and WikiText-2).

embeddings -> recurrent stack -> (projection to the output embedding width) -> softmax,
with optional tied input / output embeddings (Press & Wolf 2017).
"""
import logging

from fairseq.models import (
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from torch import nn

from ..recurrent import RecurrentStack
from .common import (
    add_dropout_args,
    add_recurrent_args,
    check_checkpoint,
    check_option_names,
    check_recurrent_options,
    check_sizes,
    dropout_module,
    embedding,
    fail,
    linear,
    set_defaults,
    set_dropout_defaults,
)

logger = logging.getLogger(__name__)

MAX_POSITIONS = 100_000


@register_model("grnn_lm")
class RecurrentLanguageModel(FairseqLanguageModel):
    @staticmethod
    def add_args(parser):
        a = parser.add_argument
        add_dropout_args(parser, "dropout before the softmax layer")
        a("--decoder-embed-dim", type=int, metavar="N")
        a("--decoder-hidden-size", type=int, metavar="N")
        a("--decoder-layers", type=int, metavar="N")
        a("--decoder-out-embed-dim", type=int, metavar="N",
          help="width before the softmax (a projection is added when it differs from the hidden size)")
        a("--share-decoder-input-output-embed", action="store_true", default=None,
          help="tie input embeddings and output projection")
        a("--no-share-decoder-input-output-embed", dest="share_decoder_input_output_embed",
          action="store_false", help="untie them")
        add_recurrent_args(parser, ["decoder"])

    @classmethod
    def build_model(cls, args, task):
        check_option_names(cls, args)
        base_lm_architecture(args)
        # translation tasks (the only ones with a src_dict) would build it over the target
        # side: training then fails deep in fairseq, generation prints unconditioned samples
        if getattr(task, "src_dict", None) is not None:
            fail("arch", args.arch, "a language model reads one token stream and has no "
                 "source side: use --task language_modeling or bptt_language_modeling (with "
                 "data binarized by fairseq-preprocess --only-source); for translation use an "
                 "RNNSearch --arch such as rnnsearch or group_rnnsearch_k2")
        check_sizes(args, "decoder-embed-dim", "decoder-hidden-size", "decoder-layers",
                    "decoder-out-embed-dim")
        check_recurrent_options(args, "decoder", args.decoder_embed_dim, args.decoder_hidden_size,
                                args.decoder_groups)
        dictionary = task.target_dictionary
        if dictionary is None:
            fail("task", getattr(args, "task", "?"), "a language model needs a target dictionary "
                 "(use --task language_modeling)")
        if args.share_decoder_input_output_embed and args.decoder_out_embed_dim != args.decoder_embed_dim:
            fail("share-decoder-input-output-embed", True, f"needs --decoder-out-embed-dim "
                 f"({args.decoder_out_embed_dim}) == --decoder-embed-dim ({args.decoder_embed_dim})")
        return cls(RecurrentLMDecoder(args, dictionary))

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_checkpoint(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def max_positions(self):
        return MAX_POSITIONS


class RecurrentLMDecoder(FairseqIncrementalDecoder):
    def __init__(self, args, dictionary):
        super().__init__(dictionary)
        self.padding_idx = dictionary.pad()
        self._carry = {}  # training flag -> (segment, batch size, state), bptt_language_modeling
        self.embed_tokens = embedding(len(dictionary), args.decoder_embed_dim, self.padding_idx)
        self.dropout_embed = dropout_module(args, "dropout-embed", self)
        self.dropout_out = dropout_module(args, "dropout-out", self)
        self.rnn = RecurrentStack(
            args.decoder_embed_dim, args.decoder_hidden_size, args.decoder_layers, cell=args.cell,
            groups=args.decoder_groups, rearrangement=args.rearrangement,
            sharing_rate=args.sharing_rate,
            init_range=getattr(args, "recurrent_init_range", None),
            dropout=dropout_module(args, "dropout-hidden", self))
        self.out_proj = (linear(args.decoder_hidden_size, args.decoder_out_embed_dim, bias=False)
                         if args.decoder_out_embed_dim != args.decoder_hidden_size else None)
        self.output_projection = nn.Linear(args.decoder_out_embed_dim, len(dictionary))
        if args.share_decoder_input_output_embed:
            self.output_projection.weight = self.embed_tokens.weight
        else:
            nn.init.uniform_(self.output_projection.weight, -0.1, 0.1)
        nn.init.zeros_(self.output_projection.bias)

    def forward(self, prev_output_tokens, incremental_state=None, segment=None, **unused):
        x, extra = self.extract_features(prev_output_tokens, incremental_state, segment)
        return self.output_layer(x), extra

    def extract_features(self, prev_output_tokens, incremental_state=None, segment=None,
                         **unused):
        """prev_output_tokens: [B, T] -> (features [B, T, E_out], {}).

        ``segment`` ([B], from ``--task bptt_language_modeling``): the batch is segment j
        of B token streams, and starts from the state that segment j - 1 ended in."""
        state = None
        carry = segment is not None and incremental_state is None
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            cached = self.get_incremental_state(incremental_state, "state")
            if cached is not None:
                state = cached["h"] if "c" not in cached else (cached["h"], cached["c"])
        elif carry:
            segment = int(segment[0])
            state = self._carried_state(segment, prev_output_tokens.shape[0])
        pad = prev_output_tokens.eq(self.padding_idx).t()
        x = self.dropout_embed(self.embed_tokens(prev_output_tokens)).transpose(0, 1)
        x, final = self.rnn(x, state, padding_mask=pad)
        if incremental_state is not None:
            cache = {"h": final[0], "c": final[1]} if isinstance(final, tuple) else {"h": final}
            self.set_incremental_state(incremental_state, "state", cache)
        elif carry:
            detached = (tuple(t.detach() for t in final) if isinstance(final, tuple)
                        else final.detach())  # truncated BPTT: no gradient into the past
            self._carry[self.training] = (segment, prev_output_tokens.shape[0], detached)
        if self.out_proj is not None:
            x = self.out_proj(x)
        return self.dropout_out(x).transpose(0, 1), {"attn": None}

    def _carried_state(self, segment, batch_size):
        """The state segment ``segment - 1`` ended in (training and evaluation each keep
        their own); None (zeros) for segment 0."""
        if segment == 0:
            return None
        carried = self._carry.get(self.training)
        if carried is None:
            logger.warning(f"segment {segment} comes without the state of segment "
                           f"{segment - 1} (a run resumed within an epoch?): it starts "
                           "from a zero state")
            return None
        last, size, state = carried
        if last != segment - 1 or size != batch_size:
            raise RuntimeError(
                f"bptt_language_modeling: segment {segment} of {batch_size} streams follows "
                f"segment {last} of {size}; the carried state only continues the segment "
                "just before it (batches must come in order, unshuffled)")
        return state

    def output_layer(self, features, **unused):
        return self.output_projection(features)

    def reorder_incremental_state(self, incremental_state, new_order):
        cached = self.get_incremental_state(incremental_state, "state")
        if cached is not None:
            self.set_incremental_state(
                incremental_state, "state", {k: v.index_select(1, new_order) for k, v in cached.items()})

    def max_positions(self):
        return MAX_POSITIONS


def base_lm_architecture(args):
    set_dropout_defaults(args, 0.2)
    set_defaults(args, decoder_embed_dim=200, decoder_hidden_size=200, decoder_layers=3)
    set_defaults(args, decoder_out_embed_dim=args.decoder_hidden_size)
    set_defaults(args, share_decoder_input_output_embed=False, cell="lstm",
                 rearrangement="both", sharing_rate=0.0, decoder_groups=1)


def _group_lstm_lm(groups):
    def arch(args):
        """Gao et al. 2018, PTB large: 2 x 1500 LSTM, untied embeddings, dropout 0.65."""
        set_defaults(args, decoder_embed_dim=1500, decoder_hidden_size=1500, decoder_layers=2,
                     dropout=0.65, cell="lstm", decoder_groups=groups)
        base_lm_architecture(args)
    return arch


for _name, _k in [("group_lstm_lm", 2), ("group_lstm_lm_k1", 1), ("group_lstm_lm_k2", 2),
                  ("group_lstm_lm_k4", 4)]:
    register_model_architecture("grnn_lm", _name)(_group_lstm_lm(_k))


def _restricted_lm(cell):
    def arch(args):
        """Diao et al. 2019: 3 x 200, embedding 200, r = 0.5, dropout 0.2 (tie with
        --share-decoder-input-output-embed)."""
        set_defaults(args, decoder_embed_dim=200, decoder_hidden_size=200, decoder_layers=3,
                     dropout=0.2, cell=cell, sharing_rate=0.5, rearrangement="none")
        base_lm_architecture(args)
    return arch


for _name, _cell in [("restricted_lm", "lstm"), ("restricted_lstm_lm", "lstm"),
                     ("restricted_gru_lm", "gru"), ("restricted_rnn_lm", "rnn")]:
    register_model_architecture("grnn_lm", _name)(_restricted_lm(_cell))
