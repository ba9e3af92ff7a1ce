"""Group weight structure (Gao et al., NAACL 2018, Eq. 4-5).

A recurrent layer of input width I and hidden width H split into K groups is K independent
cells of input width I/K and hidden width m = H/K: block-diagonal input and recurrent
weights, stored per group.  Every weight structure of this package returns the same
canonical layout, which the engines consume:

    weight_ih: [K, G*m, I/K]   weight_hh: [K, G*m, m]   bias_ih, bias_hh: [K, G*m]

with the G gates of each group stacked in PyTorch's order (LSTM i,f,g,o; GRU r,z,n), so
K=1 is exactly ``torch.nn.LSTM`` / ``GRU`` / ``RNN``'s ``weight_ih_l0`` etc.
"""
import math

import torch
from torch import nn

from .errors import ConfigError


def check_groups(groups, **widths):
    """Raise a ValueError unless ``groups`` is a positive int dividing every named width."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ConfigError(f"groups={groups!r} must be a positive integer (1 = ungrouped)")
    for name, width in widths.items():
        if width % groups != 0:
            divisors = [k for k in range(1, width + 1) if width % k == 0]
            raise ConfigError(
                f"groups={groups} does not divide {name}={width}; each group needs an equal "
                f"share of the channels: use groups in {divisors} or change {name}"
            )
    return groups


def check_init_range(init_range):
    """None (the default init) or a positive, finite bound R of U(-R, R)."""
    if init_range is None:
        return None
    if (isinstance(init_range, bool) or not isinstance(init_range, (int, float))
            or not 0.0 < init_range < math.inf):
        raise ConfigError(
            f"init_range={init_range!r} must be a positive number R (weights and biases drawn "
            "from U(-R, R)), or None for PyTorch's U(-1/sqrt(m), 1/sqrt(m)) per group")
    return float(init_range)


def init_uniform_(tensors, hidden_per_group, init_range=None):
    """Draw every tensor from U(-R, R).  R = ``init_range``, or by default PyTorch's RNN
    initialisation, R = 1/sqrt(m) with m the width of one group: a group of m units is
    initialised as a cell of width m, so the bound grows with K (sqrt(K) times the
    ungrouped layer's).  A fixed R (fairseq's LSTM uses 0.1) initialises every K alike."""
    bound = 1.0 / math.sqrt(hidden_per_group) if init_range is None else init_range
    for t in tensors:
        nn.init.uniform_(t, -bound, bound)


class GroupedWeights(nn.Module):
    """Dense per-group weights: K blocks of a standard cell (K=1: a standard cell)."""

    def __init__(self, input_size, hidden_size, gates, groups=1, init_range=None):
        super().__init__()
        check_groups(groups, input_size=input_size, hidden_size=hidden_size)
        init_range = check_init_range(init_range)
        k, m, ik = groups, hidden_size // groups, input_size // groups
        self.groups, self.gates = k, gates
        self.weight_ih = nn.Parameter(torch.empty(k, gates * m, ik))
        self.weight_hh = nn.Parameter(torch.empty(k, gates * m, m))
        self.bias_ih = nn.Parameter(torch.empty(k, gates * m))
        self.bias_hh = nn.Parameter(torch.empty(k, gates * m))
        init_uniform_(self.parameters(), m, init_range)

    def forward(self):
        """-> (weight_ih [K,G*m,I/K], weight_hh [K,G*m,m], bias_ih [K,G*m], bias_hh [K,G*m])"""
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    @staticmethod
    def count(input_size, hidden_size, gates, groups=1):
        """Exact number of parameters, without building the module."""
        m, ik = hidden_size // groups, input_size // groups
        return groups * gates * m * (ik + m + 2)
