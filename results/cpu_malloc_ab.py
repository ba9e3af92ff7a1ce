"""A/B of glibc's malloc settings on fairseq CPU training and generation
(grnn_fairseq/cpu_memory.py): ``$GRNN_KEEP_FREED_MEMORY=0`` (glibc's defaults: a fresh
mmap for every large block) against the plugin's default on a CPU-only machine (large
blocks from the heap, kept after free).

Each measurement is its own process (the setting is process-wide and glibc's dynamic
defaults cannot be restored in a process), the two settings alternating ABBA within every
round, so drift of the shared machine falls on both.  A process builds the task, model,
criterion and Adam as fairseq-train does (the plugin imported first, as ``--user-dir``
does, so fairseq's own models get the same setting), takes the first 5 + n batches of the
training set, runs 5 untimed steps, then times n (forward, backward, clip, Adam step).
Reported: target tokens/s (median over the rounds), the ratio (median of the rounds'
ratios) and the process's peak resident memory.

    python results/cpu_malloc_ab.py --data data-bin/debian/deen/data-bin \
        [--archs "group_rnnsearch_k4 rnnsearch lstm_wiseman_iwslt_de_en"] \
        [--max-tokens 1000,4000] [--rounds 2] [--threads 2]      # -> cpu_malloc_ab.txt

``--generate CKPT[,CKPT...]`` times ``fairseq-generate`` on those checkpoints instead (beam
5, the test set, every hypothesis 20 tokens, ``--max-tokens`` per batch; fairseq's own
tokens/s), with the same ABBA rounds.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(a):
    import torch

    import grnn_fairseq  # noqa: F401  (applies the setting, as --user-dir does)
    from grnn_fairseq import cpu_memory
    from fairseq import options, tasks

    torch.set_num_threads(a.threads)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        a.data, "--user-dir", os.path.join(ROOT, "grnn_fairseq"), "--arch", a.arch,
        "--task", "translation", "-s", a.src, "-t", a.tgt,
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", str(a.max_tokens), "--optimizer", "adam", "--cpu", "--seed", "1"])
    task = tasks.setup_task(args)
    task.load_dataset("train")
    model, criterion = task.build_model(args), task.build_criterion(args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=a.max_tokens,
                                  seed=1).next_epoch_itr(shuffle=True)
    batches = [next(itr) for _ in range(5 + a.steps)]
    model.train()

    def step(batch):
        opt.zero_grad()
        loss, _, log = criterion(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return log["ntokens"]

    for b in batches[:5]:
        step(b)
    t0, tokens = time.perf_counter(), 0
    for b in batches[5:]:
        tokens += step(b)
    dt = time.perf_counter() - t0
    print(json.dumps({"tok_s": tokens / dt, "kept": cpu_memory.apply(),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


GENERATE = r"""
import json, resource, sys
from fairseq_cli.generate import cli_main
sys.argv = ["fairseq-generate"] + sys.argv[1:]
cli_main()
from grnn_fairseq import cpu_memory  # imported by --user-dir already
print(json.dumps({"kept": cpu_memory.apply(),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
      file=sys.stderr)
"""


def _env(a, keep):
    return dict(os.environ, GRNN_KEEP_FREED_MEMORY=keep, OMP_NUM_THREADS=str(a.threads),
                MKL_NUM_THREADS=str(a.threads), PYTHONPATH=ROOT)


def _checked(got, keep):
    """The measurement, after checking that the process ran with the setting asked for."""
    if got["kept"] != (keep == "1"):
        sys.exit(f"GRNN_KEEP_FREED_MEMORY={keep} was not applied: {got}")
    return got


def measure_generate(a, ckpt, max_tokens, keep):
    cmd = [sys.executable, "-c", GENERATE, a.data, "-s", a.src, "-t", a.tgt, "--cpu",
           "--user-dir", os.path.join(ROOT, "grnn_fairseq"), "--task", "translation",
           "--path", ckpt, "--gen-subset", "test", "--beam", "5", "--max-tokens", str(max_tokens),
           "--num-workers", "0", "--min-len", "20", "--max-len-a", "0", "--max-len-b", "20"]
    proc = subprocess.run(cmd, env=_env(a, keep), capture_output=True, text=True)
    line = [x for x in proc.stderr.splitlines() if "Translated" in x]
    if proc.returncode != 0 or not line:
        sys.exit(f"fairseq-generate on {ckpt} failed:\n{proc.stderr[-3000:]}")
    got = _checked(json.loads(proc.stderr.strip().splitlines()[-1]), keep)
    got["tok_s"] = float(line[-1].split(" tokens/s")[0].rsplit(" ", 1)[-1])
    return got


def measure(a, arch, max_tokens, keep):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--arch", arch,
           "--max-tokens", str(max_tokens), "--data", a.data, "--src", a.src, "--tgt", a.tgt,
           "--steps", str(a.steps), "--threads", str(a.threads)]
    proc = subprocess.run(cmd, env=_env(a, keep), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return _checked(json.loads(proc.stdout.strip().splitlines()[-1]), keep)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "data-bin/debian/deen/data-bin"))
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    p.add_argument("--archs", default="group_rnnsearch_k4 rnnsearch lstm_wiseman_iwslt_de_en")
    p.add_argument("--arch", help=argparse.SUPPRESS)  # the worker's one model
    p.add_argument("--max-tokens", default="1000,4000")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per process (default 0: about 30,000 target tokens)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--generate", help="comma-separated checkpoints: time fairseq-generate")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.max_tokens = int(a.max_tokens)
        return worker(a)
    if not os.path.isdir(a.data):
        sys.exit(f"--data {a.data}: no such folder; build it with scripts/prepare-debian.sh")
    import torch

    print(f"torch {torch.__version__}, {a.threads} thread(s), {os.cpu_count()} cores; "
          f"data {os.path.relpath(a.data, ROOT)}; {a.rounds} rounds, ABBA")
    print(f"{'arch':28s} {'max-tok':>7s} {'glibc default':>14s} {'kept':>10s} {'ratio':>6s} "
          f"{'peak MB default / kept':>23s}")
    for max_tokens in [int(t) for t in a.max_tokens.split(",")]:
        steps = a.steps or max(5, 30000 // max_tokens)
        b = argparse.Namespace(**{**vars(a), "steps": steps})
        cases = a.generate.split(",") if a.generate else a.archs.split()
        for case in cases:
            runs = {"0": [], "1": []}
            for r in range(a.rounds):
                for keep in ("0", "1", "1", "0") if r % 2 == 0 else ("1", "0", "0", "1"):
                    runs[keep].append(measure_generate(b, case, max_tokens, keep) if a.generate
                                      else measure(b, case, max_tokens, keep))
            off = [x["tok_s"] for x in runs["0"]]
            on = [x["tok_s"] for x in runs["1"]]
            ratio = statistics.median(y / x for x, y in zip(off, on))
            peak = [max(x["peak_mb"] for x in runs[k]) for k in ("0", "1")]
            name = os.path.relpath(case, ROOT) if a.generate else case
            print(f"{name:28s} {max_tokens:7d} {statistics.median(off):10.0f} tok/s "
                  f"{statistics.median(on):6.0f} tok/s {ratio:5.2f}x {peak[0]:10.0f} / {peak[1]:.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
