"""RNNSearch (Bahdanau et al. 2015) with group / restricted recurrent layers.

Encoder: embeddings -> bidirectional recurrent stack -> values h_j and attention keys U h_j
(computed once per sentence) and the decoder's initial state s_0 = tanh(W_s mean_j h_j).
Decoder, at every target position i (Bahdanau et al. 2015, Eq. 4-6):

    c_i = attention(s_{i-1}, h)                       additive attention
    s_i = recurrent_stack([E y_{i-1}; c_i], s_{i-1})  group / restricted LSTM or GRU
    t_i = tanh(W_o [s_i; E y_{i-1}; c_i])             readout (deep output)
    p(y_i) = softmax(W_y t_i)

Group RNN models (Gao et al. 2018) are this model with --encoder-groups/--decoder-groups K.
"""
import functools

import torch
from fairseq.models import (
    FairseqEncoder,
    FairseqEncoderDecoderModel,
    FairseqIncrementalDecoder,
    register_model,
    register_model_architecture,
)
from fairseq.modules import FairseqDropout
from torch import nn

from .. import decode_graphs
from ..attention import AdditiveAttention
from ..recurrent import RecurrentStack, from_grouped, to_grouped
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

MAX_POSITIONS = 100_000


@register_model("grnn_rnnsearch")
class RNNSearchModel(FairseqEncoderDecoderModel):
    @staticmethod
    def add_args(parser):
        a = parser.add_argument
        add_dropout_args(parser, "dropout on encoder outputs and readout")
        a("--encoder-embed-dim", type=int, metavar="N")
        a("--encoder-hidden-size", type=int, metavar="N", help="per direction")
        a("--encoder-layers", type=int, metavar="N")
        a("--decoder-embed-dim", type=int, metavar="N")
        a("--decoder-hidden-size", type=int, metavar="N")
        a("--decoder-layers", type=int, metavar="N")
        a("--decoder-out-embed-dim", type=int, metavar="N", help="readout width")
        a("--attention-dim", type=int, metavar="N")
        a("--share-decoder-input-output-embed", action="store_true", default=None,
          help="tie the decoder's input embeddings and output projection")
        a("--no-share-decoder-input-output-embed", dest="share_decoder_input_output_embed",
          action="store_false", help="untie them (the IWSLT-sized architectures tie by default)")
        a("--share-all-embeddings", action="store_true", default=None,
          help="one embedding matrix for source, target and output (needs a joined dictionary)")
        a("--no-share-all-embeddings", dest="share_all_embeddings", action="store_false",
          help="separate source / target embeddings (WMT and Gigaword sizes share by default)")
        add_recurrent_args(parser, ["encoder", "decoder"])

    @classmethod
    def build_model(cls, args, task):
        check_option_names(cls, args)
        base_architecture(args)
        src_dict = getattr(task, "source_dictionary", None)
        # language-model tasks answer source_dictionary with their one dictionary; they
        # are told apart by the output_dictionary they set (translation tasks do not)
        if src_dict is None or hasattr(task, "output_dictionary"):
            fail("arch", args.arch, "RNNSearch is an encoder-decoder model and needs a source "
                 "side: use --task translation (or another task with source and target "
                 "dictionaries); for language models use --arch group_lstm_lm or restricted_lm")
        tgt_dict = task.target_dictionary
        check_sizes(args, "encoder-embed-dim", "encoder-hidden-size", "encoder-layers",
                    "decoder-embed-dim", "decoder-hidden-size", "decoder-layers",
                    "decoder-out-embed-dim", "attention-dim")
        check_recurrent_options(args, "encoder", args.encoder_embed_dim,
                                args.encoder_hidden_size, args.encoder_groups)
        # the decoder's recurrent input is [E y_{i-1}; c_i]: the embedding and the context
        check_recurrent_options(args, "decoder", args.encoder_hidden_size * 2 + args.decoder_embed_dim,
                                args.decoder_hidden_size, args.decoder_groups,
                                input_name="the decoder input width (--decoder-embed-dim "
                                           "+ 2 x --encoder-hidden-size)")
        enc_embed = embedding(len(src_dict), args.encoder_embed_dim, src_dict.pad())
        if args.share_all_embeddings:
            if src_dict != tgt_dict:
                fail("share-all-embeddings", True, "needs a joined dictionary "
                     "(fairseq-preprocess --joined-dictionary)")
            if args.encoder_embed_dim != args.decoder_embed_dim:
                fail("share-all-embeddings", True, f"needs --encoder-embed-dim "
                     f"({args.encoder_embed_dim}) == --decoder-embed-dim ({args.decoder_embed_dim})")
            dec_embed = enc_embed
            args.share_decoder_input_output_embed = True
        else:
            dec_embed = embedding(len(tgt_dict), args.decoder_embed_dim, tgt_dict.pad())
        if args.share_decoder_input_output_embed and args.decoder_out_embed_dim != args.decoder_embed_dim:
            fail("share-decoder-input-output-embed", True, f"needs --decoder-out-embed-dim "
                 f"({args.decoder_out_embed_dim}) == --decoder-embed-dim ({args.decoder_embed_dim})")
        encoder = RNNSearchEncoder(args, src_dict, enc_embed)
        decoder = RNNSearchDecoder(args, tgt_dict, dec_embed)
        return cls(encoder, decoder)

    def max_positions(self):
        return (MAX_POSITIONS, MAX_POSITIONS)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_checkpoint(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


class RNNSearchEncoder(FairseqEncoder):
    def __init__(self, args, dictionary, embed_tokens):
        super().__init__(dictionary)
        self.padding_idx = dictionary.pad()
        self.embed_tokens = embed_tokens
        self.dropout_embed = dropout_module(args, "dropout-embed", self)
        self.dropout_out = dropout_module(args, "dropout-out", self)
        self.rnn = RecurrentStack(
            args.encoder_embed_dim, args.encoder_hidden_size, args.encoder_layers, cell=args.cell,
            groups=args.encoder_groups, rearrangement=args.rearrangement,
            sharing_rate=args.sharing_rate, bidirectional=True,
            init_range=getattr(args, "recurrent_init_range", None),
            dropout=dropout_module(args, "dropout-hidden", self))
        value_dim = 2 * args.encoder_hidden_size
        self.attention_keys = linear(value_dim, args.attention_dim, bias=False)  # U
        self.init_state = linear(value_dim, args.decoder_hidden_size)  # W_s

    def forward(self, src_tokens, src_lengths=None, **unused):
        """src_tokens: [B, S] (left or right padded) -> dict of
        values [S, B, 2H], keys [S, B, A], init [B, H_dec], padding_mask [S, B] or None, and
        rows_per_source = 1 (decoder row r reads source r // rows_per_source)."""
        pad = src_tokens.eq(self.padding_idx).t()  # [S, B]
        pad = pad if pad.any() else None
        x = self.dropout_embed(self.embed_tokens(src_tokens)).transpose(0, 1)
        values, _ = self.rnn(x, padding_mask=pad)
        values = self.dropout_out(values)
        if pad is None:
            mean = values.mean(0)
        else:
            real = (~pad).unsqueeze(-1).type_as(values)
            mean = (values * real).sum(0) / real.sum(0)
        return {
            "values": values,
            "keys": self.attention_keys(values),
            "init": torch.tanh(self.init_state(mean)),
            "padding_mask": pad,
            "rows_per_source": 1,  # decoder rows per source (reorder_encoder_out)
        }

    def reorder_encoder_out(self, encoder_out, new_order):
        """Row r of the decoder's batch reads source ``new_order[r]``.

        Beam search asks for this at every step, with each source's beam rows side by side
        and picking rows of the same source.  The encoder outputs are then not copied per
        row: they stay one per source, with ``rows_per_source`` = E (row r reads source
        r // E), and only the sources that remain are kept when sentences finish.  Copying
        [S, B * beam, 2H + A] at every step was most of the CPU time of beam search.  Any
        other order is applied as it is (E = 1)."""
        e = encoder_out.get("rows_per_source", 1)
        src = new_order // e if e > 1 else new_order  # the source of every new row
        n_rows, n_src = src.numel(), encoder_out["values"].shape[1]
        runs = int((src[1:] != src[:-1]).sum()) + 1 if n_rows > 1 else n_rows
        if n_rows > 0 and n_rows % runs == 0:
            e_new = n_rows // runs
            groups = src.view(runs, e_new)
            sel = groups[:, 0]
            grouped, same = torch.stack([
                (groups == sel.unsqueeze(1)).all(),
                (sel == torch.arange(runs, device=sel.device)).all() if runs == n_src
                else sel.new_zeros((), dtype=torch.bool)]).tolist()
            if grouped:
                return self._pick_sources(encoder_out, None if same else sel, e_new)
        return self._pick_sources(encoder_out, src, 1)

    @staticmethod
    def _pick_sources(encoder_out, index, rows_per_source):
        """The encoder outputs of sources ``index`` (None: all, as they are)."""
        out = {"rows_per_source": rows_per_source}
        for key, dim in (("values", 1), ("keys", 1), ("init", 0), ("padding_mask", 1)):
            t = encoder_out[key]
            out[key] = t if index is None or t is None else t.index_select(dim, index)
        return out

    def max_positions(self):
        return MAX_POSITIONS


class RNNSearchDecoder(FairseqIncrementalDecoder):
    def __init__(self, args, dictionary, embed_tokens):
        super().__init__(dictionary)
        self.embed_tokens = embed_tokens
        self.dropout_embed = dropout_module(args, "dropout-embed", self)
        self.dropout_out = dropout_module(args, "dropout-out", self)
        value_dim = 2 * args.encoder_hidden_size
        self.attention = AdditiveAttention(args.decoder_hidden_size, value_dim, args.attention_dim)
        # the encoder owns U (keys are computed once per sentence); the decoder reads them
        del self.attention.key_proj
        self.rnn = RecurrentStack(
            args.decoder_embed_dim + value_dim, args.decoder_hidden_size, args.decoder_layers,
            cell=args.cell, groups=args.decoder_groups, rearrangement=args.rearrangement,
            sharing_rate=args.sharing_rate, bidirectional=False,
            init_range=getattr(args, "recurrent_init_range", None),
            dropout=dropout_module(args, "dropout-hidden", self))
        self.readout = linear(args.decoder_hidden_size + args.decoder_embed_dim + value_dim,
                              args.decoder_out_embed_dim)
        self.output_projection = nn.Linear(args.decoder_out_embed_dim, len(dictionary))
        if args.share_decoder_input_output_embed:
            self.output_projection.weight = embed_tokens.weight
        else:
            nn.init.uniform_(self.output_projection.weight, -0.1, 0.1)
        nn.init.zeros_(self.output_projection.bias)
        # decoding from CUDA graphs (GRNN_DECODE_GRAPHS=1; made at the first graphed step)
        self.step_graphs = None
        self._dropouts = [m for m in self.modules() if isinstance(m, FairseqDropout)]

    def _initial_states(self, encoder_out):
        init = encoder_out["init"]  # s_0 for every layer
        e = encoder_out.get("rows_per_source", 1)
        if e > 1:
            init = init.repeat_interleave(e, 0)
        init = to_grouped(init, self.rnn.groups)
        zero = torch.zeros_like(init)
        n = 2 if self.rnn.cell == "lstm" else 1
        return [(init,) + (zero,) * (n - 1) for _ in range(self.rnn.num_layers)]

    def _get_cache(self, incremental_state):
        cached = self.get_incremental_state(incremental_state, "states")
        if cached is None:
            return None
        if "stacked" in cached:  # written by a graphed step
            return self._unstack(cached["stacked"])
        n = 2 if self.rnn.cell == "lstm" else 1
        return [tuple(cached[f"{l}.{i}"] for i in range(n)) for l in range(self.rnn.num_layers)]

    def _unstack(self, stacked):
        """[L*n*K, B, m] (every layer's h, and c for the LSTM, one after the other) -> per
        layer a tuple of [K, B, m] views."""
        n = 2 if self.rnn.cell == "lstm" else 1
        parts = stacked.split(self.rnn.groups)
        return [tuple(parts[l * n:(l + 1) * n]) for l in range(self.rnn.num_layers)]

    def _set_cache(self, incremental_state, states):
        flat = {f"{l}.{i}": t for l, s in enumerate(states) for i, t in enumerate(s)}
        self.set_incremental_state(incremental_state, "states", flat)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **unused):
        if incremental_state is not None and self._graphs_apply(prev_output_tokens):
            return self._graphed_step(prev_output_tokens[:, -1], encoder_out, incremental_state)
        x, attn = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        return self.output_layer(x), {"attn": [attn]}

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **unused):
        """-> (readout [B, T, E_out], attention weights [B, T, S])"""
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
        states = self._get_cache(incremental_state) if incremental_state is not None else None
        if states is None:
            states = self._initial_states(encoder_out)
        keys, pad = encoder_out["keys"], encoder_out["padding_mask"]
        rows = encoder_out.get("rows_per_source", 1)
        # in training, the values' gradient once for all positions (attention.py)
        values, value_grads = self.attention.sequence_values(encoder_out["values"])
        keys, key_grads = self.attention.sequence_keys(keys)
        projection = self.attention.sequence_projection()
        emb = self.dropout_embed(self.embed_tokens(prev_output_tokens)).transpose(0, 1)  # [T, B, E]
        tops, contexts, attns = [], [], []
        rnn_weights = self.rnn.step_weights()  # restricted pools gathered once, not per step
        query = from_grouped(states[-1][0])  # s_{i-1}: the top layer's state
        for y in emb.unbind(0):
            query, states, context, weights = self._position(
                y, query, states, keys, values, pad, rows, rnn_weights,
                (value_grads, key_grads, projection))
            tops.append(query)
            contexts.append(context)
            attns.append(weights)
        if incremental_state is not None:
            self._set_cache(incremental_state, states)
        if len(tops) == 1:  # incremental decoding: views, not the copies of a stack
            out = self._readout(tops[0].unsqueeze(0), emb, contexts[0].unsqueeze(0))
            return out.transpose(0, 1), attns[0].unsqueeze(1)
        out = self._readout(torch.stack(tops), emb, torch.stack(contexts))
        return out.transpose(0, 1), torch.stack(attns, dim=1)

    def _position(self, y, query, states, keys, values, pad, rows, rnn_weights,
                  sequence=(None, None, None)):
        """One target position (Eq. 4-6 before the readout): y [B, E] the previous token's
        embedding, query s_{i-1} [B, H]; sequence: (value_grads, key_grads, projection)
        from the attention's ``sequence_values``, ``sequence_keys`` (with the values and
        keys they returned) and ``sequence_projection``, for training -> (s_i [B, H], new
        states, c_i [B, V], attention weights [B, S])."""
        context, weights = self.attention(query, keys, values, pad, rows, *sequence)
        # the top layer's output is its new state s_i, already in [B, H] (no copy)
        query, states = self.rnn.step(torch.cat([y, context], dim=-1), states, rnn_weights)
        return query, states, context, weights

    def _readout(self, tops, emb, contexts):
        """t_i = tanh(W_o [s_i; E y_{i-1}; c_i]) (any leading dimensions)."""
        return self.dropout_out(torch.tanh(self.readout(torch.cat([tops, emb, contexts], -1))))

    # ------------------------------------------------------------ decoding from CUDA graphs
    def _graphs_apply(self, tokens):
        """Whether this incremental step replays a graph (:mod:`grnn_fairseq.decode_graphs`):
        GRNN_DECODE_GRAPHS=1, generation (eval, no autograd, no dropout kept on), on the
        device the graphs record on (CUDA)."""
        if self.training or torch.is_grad_enabled() or not decode_graphs.enabled():
            return False
        if any(d.apply_during_inference and d.p > 0 for d in self._dropouts):
            return False  # --retain-dropout: random masks every step, not a fixed graph
        if self.step_graphs is None:
            if tokens.device.type != "cuda":
                return False
            self.step_graphs = decode_graphs.StepGraphs()
        return tokens.device.type == self.step_graphs.recorder.device_type

    def _graphed_step(self, tokens, encoder_out, incremental_state):
        """:meth:`forward` of one position, replayed from the graph of its shape bucket.
        tokens: [B] the previous tokens -> as forward (logits [B, 1, V], attention)."""
        cached = self.get_incremental_state(incremental_state, "states")
        if cached is not None and "stacked" in cached:  # the step before was graphed too
            stacked = cached["stacked"]
        else:  # one tensor to copy in, not L*n
            states = self._get_cache(incremental_state) or self._initial_states(encoder_out)
            stacked = torch.cat([t for s in states for t in s])
        values, keys = encoder_out["values"], encoder_out["keys"]
        rows = encoder_out.get("rows_per_source", 1)
        s, n = values.shape[:2]
        if tokens.shape[0] != n * rows:
            raise ValueError(f"decoder step: {tokens.shape[0]} rows for {n} sources of "
                             f"{rows} rows each")
        n_b, s_b = decode_graphs.source_bucket(n), decode_graphs.length_bucket(s)
        graph = self.step_graphs.get(
            (n_b, s_b, rows, stacked.dtype, values.dtype, torch.is_autocast_enabled("cuda")),
            lambda recorder: decode_graphs.StepGraph(
                recorder, functools.partial(self._graph_fn, rows), tokens, stacked,
                (values, keys), n_b, s_b, rows))
        logits, attn, new = graph(tokens, stacked, (values, keys), encoder_out["padding_mask"])
        self.set_incremental_state(incremental_state, "states", {"stacked": new})
        return logits.unsqueeze(1), {"attn": [attn.unsqueeze(1)]}

    def _graph_fn(self, rows, tokens, mask, stacked, values, keys):
        """What a graph records: the step of :meth:`extract_features` for one position,
        the output layer included (see decode_graphs.StepGraph)."""
        states = self._unstack(stacked)
        y = self.dropout_embed(self.embed_tokens(tokens))
        query, states, context, weights = self._position(
            y, from_grouped(states[-1][0]), states, keys, values, mask, rows,
            self.rnn.step_weights())
        logits = self.output_layer(self._readout(query, y, context))
        return logits, weights, torch.cat([t for s in states for t in s])

    def output_layer(self, features, **unused):
        return self.output_projection(features)

    def reorder_incremental_state(self, incremental_state, new_order):
        cached = self.get_incremental_state(incremental_state, "states")
        if cached is None:
            return
        self.set_incremental_state(
            incremental_state, "states", {k: v.index_select(1, new_order) for k, v in cached.items()})

    def max_positions(self):
        return MAX_POSITIONS


def base_architecture(args):
    """Defaults of every RNNSearch architecture; the named ones below change sizes only."""
    set_dropout_defaults(args, 0.2)
    set_defaults(args, encoder_embed_dim=256, encoder_hidden_size=256, encoder_layers=1,
                 decoder_embed_dim=256, decoder_hidden_size=256, decoder_layers=1)
    set_defaults(args, decoder_out_embed_dim=args.decoder_embed_dim,
                 attention_dim=args.decoder_hidden_size)
    set_defaults(args, share_decoder_input_output_embed=False, share_all_embeddings=False,
                 cell="lstm", rearrangement="both", sharing_rate=0.0,
                 encoder_groups=1, decoder_groups=1)


# Sizes chosen so the parameter counts land within 5% of Gao et al. (2018) with each
# dataset's standard vocabulary (README, "Parameter counts"; tests/test_params.py).
SIZES = {
    # IWSLT14 De-En: dictionaries 8,848 (de) / 6,632 (en), tied decoder embeddings.
    "iwslt": dict(encoder_embed_dim=128, decoder_embed_dim=128, encoder_hidden_size=256,
                  decoder_hidden_size=256, encoder_layers=2, decoder_layers=2, attention_dim=256,
                  share_decoder_input_output_embed=True, dropout=0.3),
    # WMT14 En-De: joined sentencepiece dictionary of 40k, all embeddings shared.
    "wmt_en_de": dict(encoder_embed_dim=1000, decoder_embed_dim=1000, encoder_hidden_size=1000,
                      decoder_hidden_size=1000, encoder_layers=4, decoder_layers=4,
                      attention_dim=1000, share_all_embeddings=True, dropout=0.2),
    # Gigaword: joined dictionary of 30k, all embeddings shared.
    "gigaword": dict(encoder_embed_dim=256, decoder_embed_dim=256, encoder_hidden_size=512,
                     decoder_hidden_size=512, encoder_layers=2, decoder_layers=2,
                     attention_dim=512, share_all_embeddings=True, dropout=0.2),
}


def _architecture(size, groups=1, sharing_rate=0.0):
    def arch(args):
        set_defaults(args, encoder_groups=groups, decoder_groups=groups,
                     sharing_rate=sharing_rate, **SIZES[size])
        base_architecture(args)
    arch.__doc__ = f"RNNSearch, {size} sizes, K={groups}, r={sharing_rate}"
    return arch


ARCHITECTURES = {"rnnsearch": ("iwslt", 1, 0.0), "restricted_rnnsearch": ("iwslt", 1, 0.5),
                 "rnnsearch_wmt_en_de": ("wmt_en_de", 1, 0.0),
                 "restricted_rnnsearch_wmt_en_de": ("wmt_en_de", 1, 0.5),
                 "rnnsearch_gigaword": ("gigaword", 1, 0.0),
                 "restricted_rnnsearch_gigaword": ("gigaword", 1, 0.5)}
for _k in (2, 4, 8, 16):
    ARCHITECTURES[f"group_rnnsearch_k{_k}"] = ("iwslt", _k, 0.0)
    ARCHITECTURES[f"group_rnnsearch_gigaword_k{_k}"] = ("gigaword", _k, 0.0)
for _k in (2, 4, 8):  # 16 groups do not divide the WMT width of 1,000
    ARCHITECTURES[f"group_rnnsearch_wmt_en_de_k{_k}"] = ("wmt_en_de", _k, 0.0)
for _name, _spec in ARCHITECTURES.items():
    register_model_architecture("grnn_rnnsearch", _name)(_architecture(*_spec))
