"""Target tokens/s of whole training steps (forward, backward, Adam) of ARCH on the
Debian De-En corpus, in this process's version of the code: 5 warm-up steps, then 25
timed, on the first real batches (at most 1,000 tokens) of a shuffled epoch with fixed
dropout masks.  For A/Bs across commits, where the two versions cannot share a process
(results/cpu_fused_avx2_ab.sh runs it in a worktree of each, in turn, with this
checkout's debian_training_setup.py: the harness is the same, the library differs).
  python results/cpu_training_tok_s.py ARCH"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from debian_training_setup import ROOT, training_setup, training_step  # noqa: E402


def main(arch, warmup=5, timed=25):
    task, model, opt, batches = training_setup(arch, [], warmup + timed)
    import grnn_fairseq
    if not Path(grnn_fairseq.__file__).resolve().is_relative_to(ROOT):
        sys.exit(f"grnn_fairseq was imported from {grnn_fairseq.__file__}, not from {ROOT}: "
                 f"run with PYTHONPATH={ROOT}")

    for b in batches[:warmup]:
        training_step(task, model, opt, b)
    seconds = sum(training_step(task, model, opt, b) for b in batches[warmup:])
    tokens = sum(b["ntokens"] for b in batches[warmup:])
    print(f"{arch}, {torch.get_num_threads()} threads, {timed} steps: "
          f"target tok/s {tokens / seconds:.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
