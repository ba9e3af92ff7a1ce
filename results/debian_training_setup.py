"""What the CPU training A/B scripts share: an RNNSearch model of architecture ARCH on
the Debian De-En corpus (data-bin/debian/deen, from scripts/prepare-debian.sh), in
training mode with Adam, real training batches, and an A/B of two versions of the code
through whole training steps."""
import statistics
import sys
import time
from pathlib import Path

import torch
from fairseq import options, tasks, utils
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

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


def training_step(task, model, opt, b, update=True):
    """One training step on batch b (forward, label-smoothed loss, backward, and the
    optimizer's step unless not ``update``), with the dropout masks of seed 1 -> seconds."""
    ni = b["net_input"]
    torch.manual_seed(1)  # the same dropout masks for every version timed
    t = time.perf_counter()
    out, _ = model(ni["src_tokens"], ni["src_lengths"], ni["prev_output_tokens"])
    lp = torch.log_softmax(out.float(), -1)
    loss, _ = label_smoothed_nll_loss(lp.view(-1, lp.size(-1)), b["target"].view(-1),
                                      0.1, ignore_index=task.target_dictionary.pad())
    opt.zero_grad()
    loss.backward()
    if update:
        opt.step()
    return time.perf_counter() - t


def ab(arch, versions, n_batches=35, warmup=5):
    """Time whole training steps (forward, backward, Adam) of ARCH under two versions of
    the code, alternating batch by batch (the order swapped every batch) on the same real
    batches (at most 1,000 tokens) with the same dropout masks; first check that both
    give the same gradients.  versions: {name: function that switches that version on}.
    Prints the largest gradient difference, target tok/s of each, and the median ratio
    of per-batch times (first name / second)."""
    task, model, opt, batches = training_setup(arch, sys.argv[2:], n_batches, lr=1e-4)
    (name_a, on_a), (name_b, on_b) = versions.items()

    def step(b, switch_on, update=True):
        switch_on()
        return training_step(task, model, opt, b, update)

    grads = []
    for switch_on in (on_a, on_b):  # no update in between
        step(batches[0], switch_on, update=False)
        grads.append([p.grad.clone() for p in model.parameters()])
    worst = max(((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()
                for a, b in zip(*grads))
    print(f"{arch}: largest gradient difference, relative to the tensor's largest: "
          f"{worst:.1e}")
    for b in batches[:warmup]:
        step(b, on_a), step(b, on_b)
    times = {name_a: [], name_b: []}
    tokens = 0
    for i, b in enumerate(batches[warmup:]):
        order = ((name_a, on_a), (name_b, on_b))
        for name, switch_on in (order if i % 2 == 0 else order[::-1]):
            times[name].append(step(b, switch_on))
        tokens += b["ntokens"]
    tok_s = {k: tokens / sum(v) for k, v in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times[name_a], times[name_b]))
    print(f"{arch}, {torch.get_num_threads()} threads, {len(times[name_a])} batches: "
          f"target tok/s {name_a} {tok_s[name_a]:.0f}, {name_b} {tok_s[name_b]:.0f}; "
          f"median per-batch time ratio {name_a} / {name_b} {ratio:.3f}")


def ab_switch(variant, key, off_name, on_name):
    """:func:`ab` of the architecture named on the command line with a module's 0|1
    switch ``variant[key]`` at "0" (called off_name) and at "1" (on_name)."""
    def use(value):
        def switch_on():
            variant[key] = value
        return switch_on

    ab(sys.argv[1], {off_name: use("0"), on_name: use("1")})


if __name__ == "__main__":
    sys.exit("a module for results/cpu_*.py, not a script")
