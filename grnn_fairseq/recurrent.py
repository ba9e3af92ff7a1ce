"""Recurrent layers and stacks: one configurable family for both papers.

``RecurrentStack`` = layers x directions x dropout x rearrangement over one weight
structure (dense / groups / restricted pool) and one cell (lstm / gru / rnn).  K=1 and
r=0 give exactly ``torch.nn.LSTM`` / ``GRU`` / ``RNN``.

Representation rearrangement (Gao et al. 2018, Sec. 3.2), modes:
  ``none``  no shuffle;
  ``layer`` shuffle the input of every layer after the first (the previous layer's output);
  ``time``  shuffle h_{t-1} before the recurrent product W_hh h_{t-1} at every step;
  ``both``  (default) both.
The time shuffle permutes only what the recurrent weights *read*.  Each unit keeps its own
carried state in place: the LSTM cell state c_{t-1} and the GRU interpolation term
z * h_{t-1} are not shuffled, and the layer's outputs h_t come out in unit order.  So a
unit's memory stays its own while its gates see features of every group; shuffling c too
would only relabel units (a fixed permutation), not change what the model can express.

Shapes follow ``torch.nn.LSTM`` (time-major): input [T, B, I], output [T, B, D*H], states
[L*D, B, H] (``(h, c)`` for LSTM, ``h`` for GRU / RNN).
"""
import torch
from torch import nn

from . import engine
from .cells import GATES, check_cell, state_size
from .errors import ConfigError
from .rearrangement import (REARRANGEMENT_MODES, check_mode, rearrange, rearranged_flat,
                            uses_layer, uses_time)
from .restricted import RestrictedWeights, check_sharing_rate
from .weights import GroupedWeights, check_groups


def make_weights(input_size, hidden_size, cell, groups=1, sharing_rate=0.0, init_range=None):
    """Dense / grouped weights for r=0, the restricted pool for r>0; ``init_range``: see
    :func:`weights.init_uniform_`."""
    gates = GATES[check_cell(cell)]
    if check_sharing_rate(sharing_rate) == 0.0:
        return GroupedWeights(input_size, hidden_size, gates, groups, init_range)
    return RestrictedWeights(input_size, hidden_size, gates, groups, sharing_rate, init_range)


def count_weights(input_size, hidden_size, cell, groups=1, sharing_rate=0.0):
    """Exact parameter count of :func:`make_weights`, without building it."""
    gates = GATES[check_cell(cell)]
    check_groups(groups, input_size=input_size, hidden_size=hidden_size)
    if check_sharing_rate(sharing_rate) == 0.0:
        return GroupedWeights.count(input_size, hidden_size, gates, groups)
    return RestrictedWeights.count(input_size, hidden_size, gates, groups, sharing_rate)


def to_grouped(x, groups):
    """[B, H] -> [K, B, H/K]"""
    return x.view(x.shape[0], groups, -1).transpose(0, 1)


def from_grouped(x):
    """[..., K, B, m] -> [..., B, K*m]"""
    return x.transpose(-3, -2).flatten(-2)


class RecurrentLayer(nn.Module):
    """One layer, one or two directions.  Each direction has its own weight structure."""

    def __init__(self, input_size, hidden_size, cell="lstm", groups=1, sharing_rate=0.0,
                 time_shuffle=True, bidirectional=False, backend=None, init_range=None):
        super().__init__()
        self.cell, self.groups, self.hidden_size = check_cell(cell), groups, hidden_size
        self.backend = backend  # engine backend (None: $GRNN_BACKEND or auto)
        self.time_shuffle = bool(time_shuffle) and groups > 1
        self.directions = nn.ModuleList(
            make_weights(input_size, hidden_size, cell, groups, sharing_rate, init_range)
            for _ in range(2 if bidirectional else 1)
        )

    def forward(self, x, state, mask=None):
        """x: [T, B, I]; state: per direction a tuple of [K, B, m]; mask: [T, B] (True = token).
        -> out [T, B, D*H], final states (per direction a tuple of [K, B, m])."""
        x = x.contiguous()  # (fairseq's encoders give [T, B, I] transposed): one copy
        outs, finals = [], []
        for d, weights in enumerate(self.directions):
            w_ih, w_hh, b_ih, b_hh = weights()
            out, final = engine.project_scan(x, w_ih, b_ih, state[d], w_hh, b_hh, self.cell,
                                             self.time_shuffle, mask, reverse=d == 1,
                                             backend=self.backend)
            outs.append(from_grouped(out))
            finals.append(final)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out, finals

    def step(self, x_t, state, weights=None, shuffle_out=False):
        """One step of a unidirectional layer (incremental decoding).
        x_t: [B, I]; state: tuple of [K, B, m]; weights: this layer's entry of
        ``RecurrentStack.step_weights()`` (computed once for many steps) or None;
        shuffle_out: h_t in the order of the rearrangement between layers
        (``rearrange(h_t, K)``, what the next layer reads), made without a second copy
        -> (h_t [B, H], new state)."""
        w_ih, w_hh, b_ih, b_hh = weights if weights is not None else self.directions[0]()
        grads = getattr(weights, "grads", None)
        if grads is not None and weights.engine == "cpp" and x_t.shape[0] > 0:
            h, new_state = engine.cpp_train_step(x_t, state, w_ih, b_ih, w_hh, b_hh, self.cell,
                                                 self.time_shuffle, grads)
        else:
            fused = engine.fused_step(x_t, state, w_ih, b_ih, w_hh, b_hh, self.cell,
                                      self.time_shuffle, self.backend, grads, shuffle_out)
            if fused is not None:
                return fused
            gx = engine.project_input(x_t, w_ih, b_ih)
            h, new_state = engine.recurrent_step(gx, state, w_hh.transpose(1, 2),
                                                 b_hh.unsqueeze(1), self.cell,
                                                 self.time_shuffle, self.backend)
        if shuffle_out:
            return rearranged_flat(h), new_state
        return from_grouped(h), new_state


class RecurrentStack(nn.Module):
    """Stacked (bi)directional group / restricted LSTM, GRU or RNN.

    Args:
        input_size, hidden_size: widths I and H (per direction).
        num_layers: L.
        cell: ``lstm`` | ``gru`` | ``rnn``.
        groups: K, the number of groups of every layer (must divide I, H and D*H).
        rearrangement: ``none`` | ``layer`` | ``time`` | ``both``.
        sharing_rate: r in [0, 1], one value or one per layer (0 = no restriction).
        bidirectional: D = 2 if set.
        dropout: dropout on the outputs of every layer but the last: a rate, or a module
            (the models pass fairseq's ``FairseqDropout``, which ``--retain-dropout`` can
            keep on in generation).
        backend: recurrence engine, ``auto`` | ``reference`` | ``torch`` | ``cpp`` | ``triton``
            (None: $GRNN_BACKEND, else ``auto``; see :mod:`grnn_fairseq.engine`).
        init_range: R > 0 draws every recurrent weight and bias from U(-R, R), the same for
            every K; None (default): PyTorch's U(-1/sqrt(m), 1/sqrt(m)) with m = H/K, the
            width of one group (:func:`grnn_fairseq.weights.init_uniform_`).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, cell="lstm", groups=1,
                 rearrangement="both", sharing_rate=0.0, bidirectional=False, dropout=0.0,
                 backend=None, init_range=None):
        super().__init__()
        if backend is not None and backend not in engine.BACKENDS:
            raise ConfigError(f"backend={backend!r} is not a recurrence backend; use one of "
                              f"{engine.BACKENDS} or None")
        check_cell(cell)
        check_mode(rearrangement)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"num_layers={num_layers!r} must be a positive integer")
        if not isinstance(dropout, nn.Module) and not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout!r} must be in [0, 1)")
        rates = sharing_rate if isinstance(sharing_rate, (list, tuple)) else [sharing_rate] * num_layers
        if len(rates) != num_layers:
            raise ConfigError(
                f"sharing_rate={sharing_rate!r} has {len(rates)} values for num_layers={num_layers}; "
                "give one value or one per layer")
        rates = [check_sharing_rate(r) for r in rates]
        self.num_directions = 2 if bidirectional else 1
        out_size = hidden_size * self.num_directions
        check_groups(groups, input_size=input_size, hidden_size=hidden_size)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.cell, self.groups, self.rearrangement = cell, groups, rearrangement
        self.sharing_rate = rates
        self.layer_shuffle = uses_layer(rearrangement) and groups > 1
        self.dropout = dropout if isinstance(dropout, nn.Module) else nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            RecurrentLayer(input_size if i == 0 else out_size, hidden_size, cell, groups, rates[i],
                           uses_time(rearrangement), bidirectional, backend, init_range)
            for i in range(num_layers)
        )
        # What the weights mean but their shapes do not show, saved with them: 1 where this
        # stack shuffles [between layers, between time steps].  A state dict trained with
        # another rearrangement (fairseq's --model-overrides "{'rearrangement': 'none'}")
        # is refused on load instead of running with its channels read in the wrong order.
        self.register_buffer("shuffles", self._shuffles(rearrangement))

    def _shuffles(self, mode):
        """The ``shuffles`` flags of ``mode`` for this stack's groups and layers: the modes
        that differ only where nothing is shuffled (K=1; ``layer`` with one layer) agree."""
        grouped = self.groups > 1
        return torch.tensor([float(grouped and self.num_layers > 1 and uses_layer(mode)),
                             float(grouped and uses_time(mode))])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "shuffles"
        saved = state_dict.get(key)
        if saved is not None and saved.shape == self.shuffles.shape:
            trained, own = saved.float().cpu() > 0.5, self.shuffles.cpu() > 0.5
            if not torch.equal(trained, own):
                modes = [m for m in REARRANGEMENT_MODES
                         if torch.equal(self._shuffles(m) > 0.5, trained)]
                raise ConfigError(
                    f"{key}: the weights were trained with rearrangement "
                    f"{' / '.join(repr(m) for m in modes) or '?'} but this stack "
                    f"(groups={self.groups}, {self.num_layers} layer(s)) was built with "
                    f"rearrangement={self.rearrangement!r}, which would read their channels "
                    f"in another order and give wrong outputs: build it with the "
                    f"rearrangement it was trained with (fairseq: --rearrangement "
                    f"{modes[-1] if modes else '...'}, or no 'rearrangement' in "
                    f"--model-overrides)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if saved is None and key in missing_keys:  # saved before 2026-11-24: nothing to check
            missing_keys.remove(key)

    @property
    def output_size(self):
        return self.hidden_size * self.num_directions

    def zero_state(self, batch_size, like):
        """Per layer and direction, a tuple of zero [K, B, m] tensors."""
        shape = (self.groups, batch_size, self.hidden_size // self.groups)
        n = state_size(self.cell)
        return [[tuple(like.new_zeros(shape) for _ in range(n)) for _ in range(self.num_directions)]
                for _ in range(self.num_layers)]

    def _split_state(self, state, batch_size, like):
        """torch-style state ([L*D, B, H] or (h, c)) -> nested per-layer grouped tuples."""
        if state is None:
            return self.zero_state(batch_size, like)
        parts = state if isinstance(state, (tuple, list)) else (state,)
        if len(parts) != state_size(self.cell):
            raise ValueError(f"a {self.cell} state has {state_size(self.cell)} tensors, got {len(parts)}")
        nd = self.num_directions
        return [[tuple(to_grouped(p[l * nd + d], self.groups) for p in parts) for d in range(nd)]
                for l in range(self.num_layers)]

    def _join_state(self, finals):
        n = state_size(self.cell)
        joined = tuple(
            torch.stack([from_grouped(fd[i]) for fl in finals for fd in fl]) for i in range(n)
        )
        return joined if n == 2 else joined[0]

    def forward(self, x, state=None, padding_mask=None):
        """x: [T, B, I]; state: torch-style initial state or None;
        padding_mask: [T, B] bool, True at padding (fairseq's convention), or None.
        -> (output [T, B, D*H], final state in torch's layout)."""
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input width {x.shape[-1]} != input_size={self.input_size}")
        mask = None if padding_mask is None or not padding_mask.any() else ~padding_mask
        states = self._split_state(state, x.shape[1], x)
        finals = []
        for i, layer in enumerate(self.layers):
            x, final = layer(self._layer_input(i, x), states[i], mask)
            finals.append(final)
        return x, self._join_state(finals)

    def _layer_input(self, i, x):
        """What layer i reads: the previous layer's output after dropout and, with
        ``layer`` / ``both`` rearrangement, the channel shuffle (the first layer: x)."""
        if i == 0:
            return x
        x = self.dropout(x)
        return rearrange(x, self.groups) if self.layer_shuffle else x

    def step_weights(self):
        """Every layer's assembled weights, for :meth:`step` over one sequence: a loop over
        time steps gathers the restricted pools once instead of at every step, and fused
        training steps compute their weight gradients once (``engine.step_weights``)."""
        return [engine.step_weights(layer.directions[0](), layer.cell, layer.backend)
                for layer in self.layers]

    def step(self, x_t, states, weights=None):
        """One time step of a unidirectional stack (incremental decoding).
        x_t: [B, I]; states: per layer a tuple of [K, B, m] (``zero_state`` layout without
        the direction level); weights: ``step_weights()`` or None
        -> (h_t of the top layer [B, H], new states).

        With the rearrangement between layers, each layer below the top writes its output
        already rearranged (``RecurrentLayer.step(shuffle_out=True)``: the Triton step
        kernel stores it so; otherwise one copy instead of two), and the dropout follows
        the shuffle instead of preceding it (the same distribution)."""
        new_states = []
        top = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x_t, s = layer.step(x_t, states[i], None if weights is None else weights[i],
                                shuffle_out=self.layer_shuffle and i < top)
            new_states.append(s)
            if i < top:
                x_t = self.dropout(x_t)
        return x_t, new_states
