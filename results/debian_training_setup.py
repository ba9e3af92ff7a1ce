"""The setup the CPU training A/B scripts share: an RNNSearch model of architecture ARCH
on the Debian De-En corpus (data-bin/debian/deen, from scripts/prepare-debian.sh), in
training mode with Adam, and a list of real training batches."""
import sys
from pathlib import Path

import torch
from fairseq import options, tasks, utils

ROOT = Path(__file__).resolve().parents[1]


def training_setup(arch, extra_args, n_batches, max_tokens=1000, lr=1e-3):
    """-> (task, model, optimizer, the first n_batches batches of a shuffled epoch)."""
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(ROOT / "data-bin/debian/deen/data-bin"), "--user-dir", str(ROOT / "grnn_fairseq"),
        "--arch", arch, "--task", "translation", "-s", "de", "-t", "en", "--cpu"] + extra_args)
    utils.import_user_module(args)
    task = tasks.setup_task(args)
    task.load_dataset("train")
    torch.manual_seed(0)
    model = task.build_model(args).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = task.get_batch_iterator(task.dataset("train"), max_tokens=max_tokens, seed=1
                                      ).next_epoch_itr(shuffle=True)
    return task, model, opt, [next(batches) for _ in range(n_batches)]


if __name__ == "__main__":
    sys.exit("a module for results/cpu_*.py, not a script")
