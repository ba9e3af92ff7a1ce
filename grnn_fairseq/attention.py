"""Additive (MLP) attention of RNNSearch (Bahdanau et al. 2015, Eq. 6 and A.1.2).

    e_ij = v^T tanh(W s_{i-1} + U h_j)      alpha_ij = softmax_j(e_ij)      c_i = sum_j alpha_ij h_j

The keys ``U h_j`` depend only on the source, so :meth:`AdditiveAttention.keys` computes
them once per sentence (the encoder keeps them in its output) and every decoder step only
projects its query.
"""
import torch
import torch.nn.functional as F
from torch import nn


class AdditiveAttention(nn.Module):
    def __init__(self, query_dim, value_dim, attention_dim):
        super().__init__()
        self.key_proj = nn.Linear(value_dim, attention_dim, bias=False)  # U
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=True)  # W (and the bias)
        self.score = nn.Linear(attention_dim, 1, bias=False)  # v

    def keys(self, values):
        """U h_j for every source position. values: [S, B, V] -> [S, B, A]"""
        return self.key_proj(values)

    def forward(self, query, keys, values, padding_mask=None):
        """query: [B, Q]  keys: [S, B, A]  values: [S, B, V]  padding_mask: [S, B] (True = pad)
        -> (context [B, V], weights [B, S])"""
        scores = self.score(torch.tanh(keys + self.query_proj(query).unsqueeze(0))).squeeze(-1)
        if padding_mask is not None:
            # -inf is exact in every float type (a -1e9 constant overflows in fp16); each
            # source has at least one real token (its EOS), so no row is all -inf.
            scores = scores.masked_fill(padding_mask, float("-inf"))
        # softmax in at least float32: half types go up, float64 stays float64
        weights = F.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)),
                            dim=0).type_as(scores)  # [S, B]
        context = torch.einsum("sb,sbv->bv", weights, values)
        return context, weights.t()
