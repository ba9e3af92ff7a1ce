"""Additive (MLP) attention of RNNSearch (Bahdanau et al. 2015, Eq. 6 and A.1.2).

    e_ij = v^T tanh(W s_{i-1} + U h_j)      alpha_ij = softmax_j(e_ij)      c_i = sum_j alpha_ij h_j

The keys ``U h_j`` depend only on the source, so :meth:`AdditiveAttention.keys` computes
them once per sentence (the encoder keeps them in its output) and every decoder step only
projects its query.

The energies are computed as e_ij = 2 v^T sigmoid(2 (W s_{i-1} + U h_j)), which is
v^T tanh(W s_{i-1} + U h_j) + sum(v) (tanh(x) = 2 sigmoid(2x) - 1): the constant sum(v) is
the same for every j, so the softmax, the weights and the context are unchanged.  On the
CPU, torch's tanh is about ten times slower than its sigmoid, and this tanh over
[S, B, A] at every target step was the largest single cost of RNNSearch decoding there.
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

    def forward(self, query, keys, values, padding_mask=None, rows_per_source=1):
        """query: [B, Q]  keys: [S, N, A]  values: [S, N, V]  padding_mask: [S, N] (True = pad)
        where query row r attends over source r // rows_per_source (N = B / rows_per_source:
        beam search keeps the encoder outputs once per source, see
        ``RNNSearchEncoder.reorder_encoder_out``) -> (context [B, V], weights [B, S])"""
        s, n = keys.shape[:2]
        q2 = self.query_proj(query).mul(2).view(1, n, rows_per_source, -1)
        # 2 (W s + U h) in one pass, the sigmoid in place (autograd keeps its output), then
        # a matrix-vector product (nn.Linear with one output is several times slower on CPU)
        hidden = torch.add(q2, keys.unsqueeze(2), alpha=2).sigmoid_()  # [S, N, E, A]
        scores = torch.matmul(hidden, self.score.weight[0] * 2)  # [S, N, E], e_ij + sum(v)
        if padding_mask is not None:
            # -inf is exact in every float type (a -1e9 constant overflows in fp16); each
            # source has at least one real token (its EOS), so no row is all -inf.
            scores = scores.masked_fill(padding_mask.unsqueeze(-1), float("-inf"))
        # softmax in at least float32: half types go up, float64 stays float64
        weights = F.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)),
                            dim=0).type_as(scores)  # [S, N, E]
        context = torch.einsum("sne,snv->nev", weights, values).reshape(n * rows_per_source, -1)
        return context, weights.reshape(s, -1).t()
