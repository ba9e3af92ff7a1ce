"""In-process A/B of whole fairseq training steps (forward, backward, Adam) on the Debian
De-En corpus: session 28's CPU changes (the projections handed to the C++ loop one tensor
per group, ``engine.project_scan`` / ``CppProjectedScan``; oneDNN's own weight-gradient op
in ``onednn.weight_grad``) against the code before them, rebuilt here as functions and
swapped in per step.  Each pass visits the same 30 real batches (at most 1,000 tokens)
after 5 warm-up steps; per batch the variants run in turn (the order alternating), so the
drifts of a shared machine hit all alike.  Only the Python-level changes are swapped: the
C++ loop's ``Tensor[] gx`` runs in every variant (it also takes the stacked tensor).

  PYTHONPATH=. python results/cpu_projection_apart_e2e_ab.py ARCH [PASSES] [VARIANTS]

VARIANTS, comma-separated (default new,old): new (the code), old (both changes undone),
stacked (the projections stacked into one tensor again), oldwg (the weight gradients as
before)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from debian_training_setup import training_setup, training_step  # noqa: E402


def old_weight_grad(d, x, bias=False):
    """onednn.weight_grad before: x_k^T d[k] through the forward op, transposed back."""
    from grnn_fairseq.kernels.onednn import _linear

    k = d.shape[0]
    xk = x.view(x.shape[0], k, -1).transpose(0, 1).contiguous()
    dw = torch.stack([_linear(xk[g].t(), d[g].t()).t() for g in range(k)])
    return (dw, d.sum(1)) if bias else dw


def stacked_project_scan(x, w_ih, b_ih, state, w_hh, b_hh, cell, time_shuffle=False,
                         mask=None, reverse=False, backend=None):
    """engine.project_scan before: the projections stacked into [T, K, B, G*m], then scan."""
    from grnn_fairseq import engine

    t, b, _ = x.shape
    k = w_ih.shape[0]
    gx = engine.project_input(x.reshape(t * b, -1), w_ih, b_ih).view(k, t, b, -1)
    return engine.scan(gx.transpose(0, 1), state, w_hh, b_hh, cell, time_shuffle, mask,
                       reverse, backend)


def main(arch, passes=3, names=("new", "old")):
    task, model, opt, batches = training_setup(arch, [], 35)
    from grnn_fairseq import engine
    from grnn_fairseq.kernels import onednn

    new = (engine.project_scan, onednn.weight_grad)
    variants = {"new": new, "old": (stacked_project_scan, old_weight_grad),
                "stacked": (stacked_project_scan, new[1]), "oldwg": (new[0], old_weight_grad)}
    unknown = set(names) - set(variants)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}: use {', '.join(variants)}")
    for b in batches[:5]:
        training_step(task, model, opt, b)
    for p in range(passes):
        seconds, tokens = dict.fromkeys(names, 0.0), 0
        for i, b in enumerate(batches[5:]):
            for name in names if i % 2 == 0 else names[::-1]:
                engine.project_scan, onednn.weight_grad = variants[name]
                seconds[name] += training_step(task, model, opt, b)
            tokens += b["ntokens"]
        print(f"{arch} pass {p}: "
              + "  ".join(f"{n} {tokens / seconds[n]:.0f} tok/s" for n in names), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3,
         tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ("new", "old"))
