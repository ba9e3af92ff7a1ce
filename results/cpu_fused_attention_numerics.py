"""How close RNNSearch's gradients are to float64, with PyTorch's attention ops
(``GRNN_CPU_ATTENTION=0``) and with the fused C++ attention (the default), in float32:
one real batch of the Debian De-En corpus, dropout off, the label-smoothed loss.  Prints,
for the tensors where the two float32 versions differ most, each one's largest
difference from float64 relative to the tensor's largest entry.

    OMP_NUM_THREADS=2 python results/cpu_fused_attention_numerics.py ARCH
"""
import copy
import sys

import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from debian_training_setup import training_setup
from grnn_fairseq.kernels import cpu_attention

arch = sys.argv[1]
task, model, _, batches = training_setup(arch, sys.argv[2:], 1)
model.eval()  # no dropout: the same function in every precision
batch = batches[0]


def gradients(m, attention):
    cpu_attention.VARIANT["attention"] = attention
    m.zero_grad()
    ni = batch["net_input"]
    out, _ = m(ni["src_tokens"], ni["src_lengths"], ni["prev_output_tokens"])
    lp = torch.log_softmax(out, -1)
    loss, _ = label_smoothed_nll_loss(lp.view(-1, lp.size(-1)), batch["target"].view(-1), 0.1,
                                      ignore_index=task.target_dictionary.pad())
    loss.backward()
    return {n: p.grad.double().clone() for n, p in m.named_parameters()}


exact = gradients(copy.deepcopy(model).double(), "1")
ops, fused = gradients(model, "0"), gradients(model, "1")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


rows = sorted(exact, key=lambda n: -rel(ops[n], fused[n]))[:8]
print(f"{arch}: float32 gradients against float64, largest difference / largest entry")
print(f"{'parameter':50s} {'torch ops':>10s} {'fused':>10s} {'ops vs fused':>12s}")
for n in rows:
    print(f"{n:50s} {rel(ops[n], exact[n]):10.1e} {rel(fused[n], exact[n]):10.1e} "
          f"{rel(ops[n], fused[n]):12.1e}")
worst = {k: max(rel(g[n], exact[n]) for n in exact) for k, g in (("ops", ops), ("fused", fused))}
print(f"worst over all tensors: torch ops {worst['ops']:.1e}, fused {worst['fused']:.1e}")
