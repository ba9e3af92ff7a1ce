"""A layer's weights for the training steps of one sequence, with the weight gradients of
all its steps computed at once.

RNNSearch's decoder is trained position by position (input feeding and attention prevent a
scan), so every step uses the same W_ih, W_hh, b_ih, b_hh.  Left to autograd, each step's
backward computes its own weight gradients (two small products and the bias sums) and
autograd adds them up, T additions of whole weight-sized tensors.  Instead, the steps'
backwards (the Triton step, ``kernels.triton_rnn._TritonStep``; the C++ step on the CPU,
``engine.CppTrainStep``) hand their gate gradients dG_t, inputs x_t and operands h'_{t-1}
over to a :class:`WeightGrads`, and :class:`SequenceWeights`, the node that gave the steps
their weights, computes

    dW_ih = sum_t dG_t^T x_t,   dW_hh = sum_t dGh_t^T h'_{t-1},   db = sum_t dG_t

per group as one batched product over all T*B rows, after the last step's backward.
"""
import torch


class WeightGrads:
    """What the backward of a layer's training steps leaves for the weight gradients, step
    after step: the gate gradients dG_t [K, B, G*m] (the GRU's hidden-side dGh_t too), the
    inputs x_t [B, K*mi] and the operands h'_{t-1} [K, B, m] (the previous state, shuffled
    where the step shuffles)."""

    __slots__ = ("dg", "dgh", "x", "operand")

    def __init__(self):
        self.dg, self.dgh, self.x, self.operand = [], [], [], []

    def add(self, dg, dgh, x, operand):
        self.dg.append(dg)
        if dgh is not None:
            self.dgh.append(dgh)
        self.x.append(x)
        self.operand.append(operand)

    def take(self):
        """-> (dG, dGh, x, h') of every step so far, each concatenated along the batch
        ([K, T*B, G*m], ..., [K, T*B, mi], [K, T*B, m]); the lists are emptied."""
        dg = torch.cat(self.dg, 1)
        dgh = torch.cat(self.dgh, 1) if self.dgh else dg
        k, mi = dg.shape[0], self.x[0].shape[1] // dg.shape[0]
        x = torch.cat(self.x).view(-1, k, mi).transpose(0, 1)
        operand = torch.cat(self.operand, 1)
        for parts in (self.dg, self.dgh, self.x, self.operand):
            parts.clear()
        return dg, dgh, x, operand


def hand_over(grads, weights_node, dg, dgh, x, operand):
    """From a step's backward: give its dG (dGh: the GRU's hidden side, else None), x and
    operand to ``grads`` if this backward pass will run ``weights_node`` (the
    :class:`SequenceWeights` node the step's weights came from), which then computes the
    weight gradients; not in, e.g., an ``autograd.grad`` of the inputs only, where what was
    handed over would be counted by the next backward that does reach the weights."""
    if torch._C._will_engine_execute_node(weights_node):
        grads.add(dg, dgh, x, operand)


class SequenceWeights(torch.autograd.Function):
    """Forward: the weights (cast once to ``dtype`` under autocast, not once per step).
    Backward, which autograd runs after the backward of every step that read them: the
    weight gradients as one batched product over all steps (the module's docstring), with
    the sums accumulated in fp32 in place of T additions rounded to the weights' dtype.
    Gradients that reach the weights some other way are added."""

    @staticmethod
    def forward(ctx, grads, cell, dtype, w_ih, w_hh, b_ih, b_hh):
        ctx.grads, ctx.gru = grads, cell == "gru"
        ctx.set_materialize_grads(False)
        return tuple(w.view_as(w) if w.dtype == dtype else w.to(dtype)
                     for w in (w_ih, w_hh, b_ih, b_hh))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *given):
        found = list(given)
        if ctx.grads.dg:
            dg, dgh, x, operand = ctx.grads.take()
            acc = torch.float64 if dg.dtype == torch.float64 else torch.float32
            d_b_ih = dg.sum(1, dtype=acc)
            d_b_hh = dgh.sum(1, dtype=acc) if ctx.gru else d_b_ih
            steps = (torch.bmm(dg.transpose(1, 2), x), torch.bmm(dgh.transpose(1, 2), operand),
                     d_b_ih, d_b_hh)
            found = [s if g is None else g + s for g, s in zip(given, steps)]
        return (None, None, None, *found)  # autograd casts each to its weight's dtype


def sequence_weights(cell, dtype, w_ih, w_hh, b_ih, b_hh):
    """(w_ih, w_hh, b_ih, b_hh) for the training steps of one sequence, in ``dtype``, and
    the :class:`WeightGrads` to hand the steps with them: the weight gradients of all steps
    are then computed at once (:class:`SequenceWeights`)."""
    grads = WeightGrads()
    return SequenceWeights.apply(grads, cell, dtype, w_ih, w_hh, b_ih, b_hh), grads
