"""A/B of the K = 1 input projection with autograd, in RNNSearch's CPU training step:
``torch.addmm`` on the selected weight matrix (before 2026-12-06, session 20) against the
batched product of one group (``engine.project_input`` now).  The same real batches of the
Debian De-En corpus (at most 1,000 tokens) through a whole training step (forward,
backward, Adam), the two versions alternating batch by batch in one process; also checks
that both give the same gradients.

    OMP_NUM_THREADS=2 python results/cpu_projection_ab.py rnnsearch
"""
import statistics
import sys
import time

import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from debian_training_setup import training_setup

arch = sys.argv[1]
task, model, opt, batches = training_setup(arch, sys.argv[2:], 35, lr=1e-4)
from grnn_fairseq import engine  # noqa: E402  (imported by the setup, as the plugin)

batched = engine.project_input


def selected(x, weight_ih, bias_ih):
    """project_input before: K = 1 always through addmm on weight_ih[0]."""
    if weight_ih.shape[0] == 1:
        return torch.addmm(bias_ih[0], x, weight_ih[0].t()).unsqueeze(0)
    return batched(x, weight_ih, bias_ih)


def step(b, fn, update=True):
    engine.project_input = fn
    ni = b["net_input"]
    torch.manual_seed(1)  # the same dropout masks for both versions
    t = time.perf_counter()
    out, _ = model(ni["src_tokens"], ni["src_lengths"], ni["prev_output_tokens"])
    lp = torch.log_softmax(out.float(), -1)
    loss, _ = label_smoothed_nll_loss(lp.view(-1, lp.size(-1)), b["target"].view(-1), 0.1,
                                      ignore_index=task.target_dictionary.pad())
    opt.zero_grad()
    loss.backward()
    if update:
        opt.step()
    return time.perf_counter() - t


# same gradients (no update in between)
grads = []
for fn in (selected, batched):
    step(batches[0], fn, update=False)
    grads.append([p.grad.clone() for p in model.parameters()])
worst = max(((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()
            for a, b in zip(*grads))
print(f"{arch}: largest gradient difference, relative to the tensor's largest: {worst:.1e}")
for b in batches[:5]:
    step(b, selected), step(b, batched)
times = {"selected": [], "batched": []}
tokens = 0
for b in batches[5:]:
    order = (("selected", selected), ("batched", batched))
    for name, fn in (order if len(times["selected"]) % 2 == 0 else order[::-1]):
        times[name].append(step(b, fn))
    tokens += b["ntokens"]
tok_s = {k: tokens / sum(v) for k, v in times.items()}
ratio = statistics.median(a / b for a, b in zip(times["selected"], times["batched"]))
print(f"{arch}, {torch.get_num_threads()} threads, {len(times['batched'])} batches: "
      f"target tok/s selected {tok_s['selected']:.0f}, batched {tok_s['batched']:.0f}; "
      f"median per-batch time ratio selected / batched {ratio:.3f}")
