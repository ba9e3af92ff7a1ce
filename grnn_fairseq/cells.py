"""Pointwise cell functions: the gate non-linearities and the state update.

Each function receives the input projection ``gx = W_ih x_t + b_ih`` and the recurrent
projection ``gh = W_hh h_{t-1} + b_hh`` (both ``[..., G*m]`` with the gates in PyTorch's
order) and the unit's own previous state, and returns ``(h_t, state_t)``.  The matrix
products live in the engine; the cell math is written once here.
"""
import torch

from .errors import ConfigError

# cell name -> number of gates G (rows of W_ih / W_hh per hidden unit)
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def check_cell(cell):
    if cell not in GATES:
        raise ConfigError(f"cell={cell!r} is not a known cell type; use one of {tuple(GATES)}")
    return cell


def lstm_pointwise(gx, gh, state):
    """LSTM (Hochreiter & Schmidhuber; PyTorch gate order i, f, g, o). state = (h, c)."""
    i, f, g, o = (gx + gh).chunk(4, -1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, (h, c)


def gru_pointwise(gx, gh, state):
    """GRU (Cho et al. 2014; PyTorch form, gate order r, z, n). state = (h,)."""
    xr, xz, xn = gx.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    h = n + z * (state[0] - n)
    return h, (h,)


def rnn_pointwise(gx, gh, state):
    """Elman RNN with tanh. state = (h,)."""
    h = torch.tanh(gx + gh)
    return h, (h,)


POINTWISE = {"lstm": lstm_pointwise, "gru": gru_pointwise, "rnn": rnn_pointwise}


def state_size(cell):
    """Number of state tensors a cell carries: LSTM (h, c), others (h,)."""
    return 2 if cell == "lstm" else 1
