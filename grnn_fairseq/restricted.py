"""Restricted weight structure (Diao, Ding & Tarokh, BigData 2019, Section III).

The input-to-hidden and hidden-to-hidden weights of every gate are rows of one pool per
layer (per group, when combined with groups).  Of the m rows a gate needs for one input
(x_t or h_{t-1}), the first S = round(r*m) rows are *shared* by all inputs and gates and
the other P = m - S rows are *private* to that (input, gate) pair:

    pool = [ shared (S rows) | private(x, gate 1) | ... | private(h, gate G) ]   (P rows each)

so a layer holds S + 2*G*P rows instead of 2*G*m.  Biases are pooled the same way.  Shared
rows span max(I, m) columns (x reads the first I, h the first m); private rows only the
width of their input, so r=0 is exactly a standard cell and no parameter goes unused.
r=1 makes every input and gate use the same m-row matrix.
"""
import torch
from torch import nn

from .errors import ConfigError
from .weights import check_groups, check_init_range, init_uniform_


def check_sharing_rate(rate):
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ConfigError(
            f"sharing_rate={rate!r} is outside [0, 1]; it is the fraction of each gate's rows "
            "taken from the shared pool (0 = standard cell, 1 = all gates share one matrix)"
        )
    return float(rate)


def shared_rows(rate, hidden_per_group):
    """S = round(r*m): the shared rows per gate (the reference code's rounding)."""
    return int(round(check_sharing_rate(rate) * hidden_per_group))


class RestrictedWeights(nn.Module):
    """Pooled weights of a restricted cell; returns the canonical grouped layout."""

    def __init__(self, input_size, hidden_size, gates, groups=1, sharing_rate=0.5,
                 init_range=None):
        super().__init__()
        check_groups(groups, input_size=input_size, hidden_size=hidden_size)
        init_range = check_init_range(init_range)
        k, m, ik = groups, hidden_size // groups, input_size // groups
        s = shared_rows(sharing_rate, m)
        p = m - s
        self.groups, self.gates, self.sharing_rate = k, gates, float(sharing_rate)
        self.input_per_group, self.hidden_per_group, self.shared, self.private = ik, m, s, p
        params = []
        if s:
            self.shared_weight = nn.Parameter(torch.empty(k, s, max(ik, m)))
            self.shared_bias = nn.Parameter(torch.empty(k, s))
            params += [self.shared_weight, self.shared_bias]
        if p:
            self.private_weight_ih = nn.Parameter(torch.empty(k, gates * p, ik))
            self.private_weight_hh = nn.Parameter(torch.empty(k, gates * p, m))
            self.private_bias_ih = nn.Parameter(torch.empty(k, gates * p))
            self.private_bias_hh = nn.Parameter(torch.empty(k, gates * p))
            params += [self.private_weight_ih, self.private_weight_hh,
                       self.private_bias_ih, self.private_bias_hh]
        init_uniform_(params, m, init_range)
        # Row g*m + j of a gate matrix reads pool row j (j < S) or S + g*P + (j - S).
        index = [j if j < s else s + g * p + (j - s) for g in range(gates) for j in range(m)]
        self.register_buffer("row_index", torch.tensor(index, dtype=torch.long), persistent=False)

    def _gather(self, shared, private):
        """Assemble one [K, G*m, ...] matrix from the shared and private rows (once per forward)."""
        if not self.shared:
            return private
        if not self.private:
            return shared.repeat(1, self.gates, *([1] * (shared.dim() - 2)))
        return torch.cat([shared, private], dim=1).index_select(1, self.row_index)

    def forward(self):
        """-> (weight_ih [K,G*m,I/K], weight_hh [K,G*m,m], bias_ih [K,G*m], bias_hh [K,G*m])"""
        ik, m = self.input_per_group, self.hidden_per_group
        sw = getattr(self, "shared_weight", None)
        sb = getattr(self, "shared_bias", None)
        pw_ih = getattr(self, "private_weight_ih", None)
        pw_hh = getattr(self, "private_weight_hh", None)
        pb_ih = getattr(self, "private_bias_ih", None)
        pb_hh = getattr(self, "private_bias_hh", None)
        return (
            self._gather(sw[..., :ik] if sw is not None else None, pw_ih),
            self._gather(sw[..., :m] if sw is not None else None, pw_hh),
            self._gather(sb, pb_ih),
            self._gather(sb, pb_hh),
        )

    @staticmethod
    def count(input_size, hidden_size, gates, groups=1, sharing_rate=0.5):
        """Exact number of parameters: K * (S*(max(I/K, m)+1) + G*P*(I/K + m + 2))."""
        m, ik = hidden_size // groups, input_size // groups
        s = shared_rows(sharing_rate, m)
        p = m - s
        return groups * (s * (max(ik, m) + 1) + gates * p * (ik + m + 2))
