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

In training, the decoder attends over the same values at every target position i, and
their gradient is dh_j = sum_i alpha_ij dc_i.  Summed by autograd, that is a full
[S, B, V] tensor made and added at every position.  :meth:`AdditiveAttention.sequence_values`
instead collects (alpha_i, dc_i) and computes the sum as one batched product after the
first position (:class:`_SequenceValues`).

The query projection's weight gradients are likewise summed once per sequence
(:meth:`AdditiveAttention.sequence_projection`: one product over all positions' rows in
place of a product, a sum and two additions per position).

Where :func:`fused` names kernels, a position's attention is one pass each way
(:class:`_FusedAttention`), whose gradients of the keys and of v are summed once per
sequence, in place (:func:`sequence_keys`): on the CPU by default where the recurrence
runs on ``cpp`` (``kernels/attention_cpu.cpp``; ``GRNN_CPU_ATTENTION=0`` keeps the ops
below), on the GPU where it runs on Triton and ``GRNN_TRITON_ATTENTION=1``
(``kernels/triton_attention.py``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import engine


def fused(keys):
    """The kernels that run one position's attention over ``keys`` in one pass each way
    (:class:`_FusedAttention`), or None for PyTorch's ops: ``kernels.triton_attention``
    where GRNN_TRITON_ATTENTION=1 and the recurrence's backend on the keys' device is
    ``triton``; ``kernels.cpu_attention`` on the CPU where it is ``cpp``, in float32 or
    float64 outside autocast, unless GRNN_CPU_ATTENTION=0."""
    if (keys.device.type == "cuda" or engine._interpreting()) and engine.triton_available():
        from .kernels import triton_attention

        if triton_attention.attention_on() and engine.resolve_backend(
                None, "lstm", keys.device, keys.dtype) == "triton":
            return triton_attention
    if keys.device.type == "cpu":
        from .kernels import cpu_attention

        if (cpu_attention.attention_on() and keys.dtype in engine.CPP_DTYPES
                and engine.autocast_dtype("cpu") is None
                and engine.resolve_backend(None, "lstm", keys.device, keys.dtype) == "cpp"):
            return cpu_attention
    return None


class AdditiveAttention(nn.Module):
    def __init__(self, query_dim, value_dim, attention_dim):
        super().__init__()
        self.key_proj = nn.Linear(value_dim, attention_dim, bias=False)  # U
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=True)  # W (and the bias)
        self.score = nn.Linear(attention_dim, 1, bias=False)  # v

    def keys(self, values):
        """U h_j for every source position. values: [S, B, V] -> [S, B, A]"""
        return self.key_proj(values)

    @staticmethod
    def sequence_values(values):
        """values [S, N, V] for the positions of one target sequence -> (values, grads):
        pass both to every position's :meth:`forward`, and the values' gradient is
        computed once for all positions.  Without autograd: (values, None)."""
        if not (values.requires_grad and torch.is_grad_enabled()):
            return values, None
        grads = ValueGrads()
        return _SequenceValues.apply(grads, values), grads

    def sequence_keys(self, keys):
        """keys [S, N, A] for the positions of one target sequence -> (keys, grads), as
        :meth:`sequence_values`: where the attention is :func:`fused`, the gradients of
        the keys and of v are summed in place for all positions; otherwise (keys, None)."""
        if not (keys.requires_grad and torch.is_grad_enabled() and fused(keys)):
            return keys, None
        return sequence_keys(keys, self.score.weight[0])

    def sequence_projection(self):
        """The query projection (W, b, grads) for the positions of one target sequence:
        pass it to every position's :meth:`forward`, and dW and db are computed once for
        all positions, as one product over their rows (:class:`_SequenceProjection`; under
        autocast W and b are cast once).  Without autograd: None."""
        weight, bias = self.query_proj.weight, self.query_proj.bias
        if not (torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad)):
            return None
        amp = engine.autocast_dtype(weight.device.type)
        grads = ProjectionGrads()
        weight, bias = _SequenceProjection.apply(
            grads, weight.dtype if amp is None else amp, weight, bias)
        return weight, bias, grads

    def project_query(self, query, projection=None):
        """W s + b: query [B, Q] -> [B, A]; projection: from :meth:`sequence_projection`."""
        if projection is None:
            return self.query_proj(query)
        weight, bias, grads = projection
        return _Projection.apply(grads, query, weight, bias)

    def forward(self, query, keys, values, padding_mask=None, rows_per_source=1,
                value_grads=None, key_grads=None, projection=None):
        """query: [B, Q]  keys: [S, N, A]  values: [S, N, V]  padding_mask: [S, N] (True = pad)
        where query row r attends over source r // rows_per_source (N = B / rows_per_source:
        beam search keeps the encoder outputs once per source, see
        ``RNNSearchEncoder.reorder_encoder_out``) -> (context [B, V], weights [B, S]).
        value_grads / key_grads: from :meth:`sequence_values` / :meth:`sequence_keys`, with
        the values / keys they returned; projection: from :meth:`sequence_projection`.
        Where :func:`fused` names kernels, one pass each way (:func:`fused_attention`)."""
        s, n = keys.shape[:2]
        kernels = fused(keys)
        if kernels is not None:
            context, weights = fused_attention(
                kernels, self.project_query(query, projection), keys, self.score.weight[0],
                values, padding_mask, rows_per_source, key_grads, value_grads)
            return context, weights.t()  # the softmax's dtype: no cast per position
        q2 = self.project_query(query, projection).mul(2).view(1, n, rows_per_source, -1)
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
        if value_grads is None:
            context = torch.einsum("sne,snv->nev", weights, values)
        else:  # dc handed to value_grads; no gradient of the values from this position
            context = _HandOver.apply(value_grads, values, weights, torch.einsum(
                "sne,snv->nev", weights, values.detach()))
        return context.reshape(n * rows_per_source, -1), weights.reshape(s, -1).t()


class ValueGrads:
    """The attention weights alpha_i [S, N, E] and context gradients dc_i [N, E, V] of
    the positions of one sequence, for :class:`_SequenceValues`."""

    __slots__ = ("weights", "d_context")

    def __init__(self):
        self.weights, self.d_context = [], []


class _SequenceValues(torch.autograd.Function):
    """The values of one sequence's attention: forward as they are; backward, which
    autograd runs after every position's :class:`_HandOver`, dh = sum_i alpha_i dc_i for
    all positions as one batched product over the sources, plus any gradient that
    reached the values some other way."""

    @staticmethod
    def forward(ctx, grads, values):
        ctx.grads = grads
        ctx.set_materialize_grads(False)
        return values.view_as(values)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, given):
        grads = ctx.grads
        if not grads.weights:
            return None, given
        weights = torch.cat(grads.weights, 2)  # [S, N, T*E]
        d_context = torch.cat(grads.d_context, 1).to(weights.dtype)  # [N, T*E, V]
        grads.weights.clear()
        grads.d_context.clear()
        d_values = torch.bmm(weights.permute(1, 0, 2), d_context).transpose(0, 1)
        return None, d_values if given is None else given + d_values


class _HandOver(torch.autograd.Function):
    """Identity on one position's context [N, E, V]; its backward hands (alpha_i, dc_i)
    to the sequence's :class:`ValueGrads`, if autograd will run :class:`_SequenceValues`
    in the same backward (not in one of other inputs only, which would leave them to be
    counted again).  Takes the values to order the two: _SequenceValues runs after."""

    @staticmethod
    def forward(ctx, grads, values, weights, context):
        ctx.grads, ctx.values_node = grads, values.grad_fn
        ctx.save_for_backward(weights)
        return context.view_as(context)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_context):
        if torch._C._will_engine_execute_node(ctx.values_node):
            ctx.grads.weights.append(ctx.saved_tensors[0])
            ctx.grads.d_context.append(d_context)
        return None, None, None, d_context


class ProjectionGrads:
    """The query projection's inputs s_{i-1} [B, Q] and output gradients dq_i [B, A] of
    the positions of one sequence, for :class:`_SequenceProjection`."""

    __slots__ = ("queries", "d_out")

    def __init__(self):
        self.queries, self.d_out = [], []


class _SequenceProjection(torch.autograd.Function):
    """The query projection's W and b for the positions of one sequence: forward as they
    are (in ``dtype``: autocast's, cast once); backward, which autograd runs after every
    position's :class:`_Projection`, dW = sum_i dq_i^T s_{i-1} as one product over all
    positions' rows and db = sum_i dq_i, plus any gradient from elsewhere.  Per position
    that saves a product, a sum and autograd's two additions into W's and b's sums."""

    @staticmethod
    def forward(ctx, grads, dtype, weight, bias):
        ctx.grads = grads
        ctx.set_materialize_grads(False)
        return tuple(w.view_as(w) if w.dtype == dtype else w.to(dtype) for w in (weight, bias))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_weight, d_bias):
        grads = ctx.grads
        if grads.d_out:
            d_out, queries = torch.cat(grads.d_out), torch.cat(grads.queries)
            grads.d_out.clear()
            grads.queries.clear()
            dw, db = d_out.t().mm(queries), d_out.sum(0)
            d_weight = dw if d_weight is None else d_weight + dw
            d_bias = db if d_bias is None else d_bias + db
        return None, None, d_weight, d_bias  # autograd casts each to its parameter's dtype


class _Projection(torch.autograd.Function):
    """q = W s + b at one position; its backward returns ds = dq W and hands (s, dq) to
    the sequence's :class:`ProjectionGrads` instead of computing dW and db, if autograd
    will run :class:`_SequenceProjection` in the same backward (as :class:`_HandOver`)."""

    @staticmethod
    def forward(ctx, grads, query, weight, bias):
        ctx.grads, ctx.weights_node = grads, weight.grad_fn
        query = query.to(weight.dtype)
        ctx.save_for_backward(query, weight)
        return torch.addmm(bias, query, weight.t())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        query, weight = ctx.saved_tensors
        d_query = d_out.mm(weight) if ctx.needs_input_grad[1] else None
        if torch._C._will_engine_execute_node(ctx.weights_node):
            ctx.grads.queries.append(query)
            ctx.grads.d_out.append(d_out)
        return None, d_query, None, None


class KeyGrads:
    """The gradients of the keys [S, N, A] and of v, per query row [B, A], of the positions
    of one sequence, added in place by each position's fused backward, for
    :class:`_SequenceKeys` (in the kernels' ``sum_dtype``: fp32 on Triton)."""

    __slots__ = ("sums",)

    def __init__(self):
        self.sums = None

    def buffers(self, keys, rows, dtype):
        """-> (dk, dv) to add into: zeros at the first position of a backward."""
        if self.sums is None:
            self.sums = tuple(torch.zeros(shape, dtype=dtype, device=keys.device)
                              for shape in (keys.shape, (rows, keys.shape[2])))
        return self.sums


class _SequenceKeys(torch.autograd.Function):
    """The keys of one sequence's attention: forward as they are; backward, which autograd
    runs after every position's :class:`_FusedAttention`, the keys' summed gradient plus
    any that reached them some other way, and v's (the positions return none for v: it
    is an input here for this gradient only)."""

    @staticmethod
    def forward(ctx, grads, keys, v):
        ctx.grads = grads
        ctx.set_materialize_grads(False)
        return keys.view_as(keys)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, given):
        sums, ctx.grads.sums = ctx.grads.sums, None
        if sums is None:
            return None, given, None
        return None, sums[0] if given is None else given + sums[0], sums[1].sum(0)


def sequence_keys(keys, v):
    """keys [S, N, A] and v [A] for the positions of one target sequence -> (keys, grads):
    pass both to every position's :func:`fused_attention`, and the gradients of the keys
    and of v are summed in place, once for all positions.  Without autograd: (keys,
    None)."""
    if not (keys.requires_grad and torch.is_grad_enabled()):
        return keys, None
    grads = KeyGrads()
    return _SequenceKeys.apply(grads, keys, v), grads


class _FusedAttention(torch.autograd.Function):
    """One position's attention in one pass each way, by ``kernels`` (:func:`fused`), plus
    in the backward the values' hand-over (or their gradient) and, outside a sequence,
    the sum of the rows' shares of dv."""

    @staticmethod
    def forward(ctx, kernels, key_grads, value_grads, rows, q, keys, v, values, mask):
        # the sequence's nodes (before any copy, which would have none)
        ctx.keys_node = keys.grad_fn if key_grads is not None else None
        ctx.values_node = values.grad_fn if value_grads is not None else None
        q, keys, v, values = (t.contiguous() for t in (q, keys, v, values))
        context, weights = kernels.forward(q, keys, v, values, mask, rows)
        ctx.kernels, ctx.rows = kernels, rows
        ctx.key_grads, ctx.value_grads = key_grads, value_grads
        ctx.save_for_backward(q, keys, v, values, weights)
        ctx.set_materialize_grads(False)
        return context, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_context, d_weights):
        q, keys, v, values, weights = ctx.saved_tensors
        s, n, _ = keys.shape
        b, vdim = q.shape[0], values.shape[2]
        need_q, need_k, need_v, need_values = ctx.needs_input_grad[4:8]
        if d_context is None:
            d_context = torch.zeros(b, vdim, dtype=values.dtype, device=q.device)
        keys_mode, d_keys, dv_rows = 0, None, None
        if ctx.key_grads is not None:
            if torch._C._will_engine_execute_node(ctx.keys_node):
                keys_mode = 2  # added into the sequence's sums, dv too
                d_keys, dv_rows = ctx.key_grads.buffers(
                    keys, b, ctx.kernels.sum_dtype(keys.dtype))
        elif need_k:
            keys_mode = 1
        d_q, d_keys, dv_rows = ctx.kernels.backward(
            d_context, d_weights, weights, q, keys, v, values, ctx.rows, keys_mode, d_keys,
            dv_rows)
        d_values = None
        alpha = weights.view(s, n, ctx.rows).to(values.dtype)
        d_ctx = d_context.view(n, ctx.rows, vdim)
        if ctx.value_grads is not None:
            if torch._C._will_engine_execute_node(ctx.values_node):
                ctx.value_grads.weights.append(alpha)
                ctx.value_grads.d_context.append(d_ctx)
        elif need_values:
            d_values = torch.einsum("sne,nev->snv", alpha, d_ctx.to(alpha.dtype))
        return (None, None, None, None, d_q if need_q else None,
                d_keys if keys_mode == 1 else None,
                dv_rows.sum(0) if need_v and keys_mode != 2 else None, d_values, None)


def fused_attention(kernels, q, keys, v, values, padding_mask=None, rows_per_source=1,
                    key_grads=None, value_grads=None):
    """One position's attention by ``kernels`` (from :func:`fused`): q [B, A] (W s + b),
    keys [S, N, A], v [A], values [S, N, V], padding_mask [S, N] (True = pad), B = N *
    rows_per_source -> (context [B, V] in the values' dtype, alpha [S, B] in the kernels'
    softmax dtype).  key_grads / value_grads: from :func:`sequence_keys` and
    :meth:`AdditiveAttention.sequence_values`, with the keys and values they returned."""
    return _FusedAttention.apply(kernels, key_grads, value_grads, rows_per_source, q, keys, v,
                                 values, padding_mask)
