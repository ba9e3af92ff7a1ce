"""End to end through fairseq's own commands (subprocesses) on tiny synthetic data.

Data: made-up parallel sentences over a 30-word vocabulary (the target is the source
reversed, word by word renamed) and a summarization-style set (the "summary" is the first
three source words), written to a temporary folder; nothing else is read.  Models are tiny
(widths 16) so every command runs in seconds; each process gets one thread.

Where a number can be checked another way it is: fairseq-validate and fairseq-eval-lm
must reproduce the validation loss that training logged for the same checkpoint, a run
killed and resumed must end with the same weights as an uninterrupted run, and two
gloo processes must end with the same weights as one process with --update-freq 2.
"""
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq.data import Dictionary
from synthetic import write_lines, write_reversal_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "grnn_fairseq")
TIMEOUT = 300
WORDS = [f"s{i}" for i in range(30)]
N_TRAIN, N_VALID, N_TEST = 300, 30, 30

TINY_MT = ["--encoder-embed-dim", "16", "--encoder-hidden-size", "16",
           "--decoder-embed-dim", "16", "--decoder-hidden-size", "16",
           "--decoder-out-embed-dim", "16", "--attention-dim", "16",
           "--encoder-layers", "1", "--decoder-layers", "1"]
COMMON = ["--user-dir", USER_DIR, "--cpu", "--num-workers", "0"]
TRAIN = COMMON + ["--optimizer", "adam", "--lr", "0.01", "--no-progress-bar",
                  "--log-format", "simple", "--seed", "1", "--no-epoch-checkpoints"]


# --------------------------------------------------------------------------- helpers
def command(name):
    """fairseq's console script next to this Python, else the same module with -m."""
    script = Path(sys.executable).parent / f"fairseq-{name}"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", f"fairseq_cli.{name.replace('-', '_')}"]


def env():
    # one thread per process: 2 shared cores, and several processes run at once below
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(name, *args, stdin=None, check=True, cwd=None):
    proc = subprocess.run(command(name) + [str(a) for a in args], input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT, env=env(), cwd=cwd)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        pytest.fail(f"fairseq-{name} exited with {proc.returncode}:\n{out[-4000:]}")
    return proc.returncode, out


def valid_losses(log):
    """Validation losses logged by fairseq-train (base 2, in order)."""
    return [float(x) for x in re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", log)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def max_weight_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# --------------------------------------------------------------------------- data and models
@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fairseq_cli")


@pytest.fixture(scope="session")
def mt_data(work):
    """De-En-like parallel data: target = source reversed, s<i> renamed t<i>."""
    raw = work / "mt_raw"
    write_reversal_corpus(raw, (("train", N_TRAIN), ("valid", N_VALID), ("test", N_TEST)),
                          WORDS, max_len=10)
    dest = work / "mt_bin"
    run("preprocess", "--source-lang", "de", "--target-lang", "en", "--trainpref", raw / "train",
        "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir", dest,
        "--workers", "1")
    assert (dest / "dict.de.txt").exists() and (dest / "train.de-en.en.bin").exists()
    return dest


@pytest.fixture(scope="session")
def mt_model(work, mt_data):
    save = work / "mt_ckpt"
    _, log = run("train", mt_data, *TRAIN, "--arch", "group_rnnsearch_k2", *TINY_MT,
                 "--max-epoch", "2", "--batch-size", "16", "--save-dir", save,
                 "--log-interval", "5")
    assert "done training" in log, log[-3000:]
    return save / "checkpoint_last.pt", log


@pytest.fixture(scope="session")
def lm_model(work, mt_data):
    raw = work / "mt_raw"
    dest = work / "lm_bin"
    run("preprocess", "--only-source", "--trainpref", raw / "train.en", "--validpref",
        raw / "valid.en", "--testpref", raw / "test.en", "--destdir", dest, "--workers", "1")
    save = work / "lm_ckpt"
    _, log = run("train", dest, *TRAIN, "--task", "language_modeling", "--sample-break-mode", "eos",
                 "--tokens-per-sample", "64", "--arch", "restricted_lstm_lm",
                 "--decoder-embed-dim", "16", "--decoder-hidden-size", "16",
                 "--decoder-layers", "2", "--share-decoder-input-output-embed",
                 "--max-epoch", "1", "--batch-size", "16", "--save-dir", save)
    assert "done training" in log, log[-3000:]
    return dest, save / "checkpoint_last.pt", log


# one configuration shared by the resume and the multi-process tests: dropout 0 and fixed
# batches of 10 sentences, so runs that should agree agree to the last bit
EXACT = TRAIN + ["--arch", "group_rnnsearch_k2", *TINY_MT, "--dropout", "0", "--max-epoch", "1",
                 "--batch-size", "10", "--required-batch-size-multiple", "1"]
EXACT_UPDATES = N_TRAIN // 20  # batches of 10, two per update


@pytest.fixture(scope="session")
def reference_run(work, mt_data):
    """One uninterrupted process with --update-freq 2 (two batches per update)."""
    save = work / "ref_ckpt"
    _, log = run("train", mt_data, *EXACT, "--update-freq", "2", "--save-dir", save)
    assert f"num_updates {EXACT_UPDATES}" in log, log[-3000:]
    return load_weights(save / "checkpoint_last.pt")


# --------------------------------------------------------------------------- translation
def test_train_uses_our_model_and_learns(mt_model):
    _, log = mt_model
    assert "model: RNNSearchModel" in log
    losses = valid_losses(log)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[1] < losses[0], losses


def test_generate_beam5_prints_bleu(mt_data, mt_model):
    ckpt, _ = mt_model
    _, out = run("generate", mt_data, *COMMON, "--path", ckpt, "--beam", "5",
                 "--batch-size", "16")
    assert re.search(r"Generate test with beam=5: BLEU4? = [\d.]+", out), out[-2000:]
    hyps = re.findall(r"^H-(\d+)\t(\S+)\t", out, re.M)
    assert all(math.isfinite(float(score)) for _, score in hyps)
    # every test sentence is translated (fairseq 0.12 alone drops the last partial batch,
    # facebookresearch/fairseq#5036; grnn_fairseq.compat puts it back)
    assert sorted(int(i) for i, _ in hyps) == list(range(N_TEST))


def test_interactive_beam5_reads_stdin(mt_data, mt_model):
    ckpt, _ = mt_model
    rng = random.Random(3)
    long_line = " ".join(rng.choice(WORDS + ["unseenword"]) for _ in range(1000))
    lines = ["s1 s2 s3", "", long_line, "s4 unseenword s5"]
    _, out = run("interactive", mt_data, *COMMON, "--path", ckpt, "--beam", "5",
                 "--source-lang", "de", "--target-lang", "en", "--buffer-size", "2",
                 "--batch-size", "2", stdin="\n".join(lines) + "\n")
    ids = sorted(int(i) for i in re.findall(r"^H-(\d+)\t", out, re.M))
    assert ids == list(range(len(lines))), out[-3000:]
    assert re.search(r"^S-1\t$", out, re.M)  # the empty line went through as an empty source


def test_validate_reproduces_training_valid_loss(mt_data, mt_model):
    ckpt, log = mt_model
    _, out = run("validate", mt_data, *COMMON, "--path", ckpt, "--task", "translation",
                 "--batch-size", "16")
    loss = re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", out)
    assert loss, out[-2000:]
    assert abs(float(loss[-1]) - valid_losses(log)[-1]) <= 0.0015


# --------------------------------------------------------------------------- language model
def test_eval_lm_reports_perplexity(lm_model):
    data, ckpt, log = lm_model
    _, out = run("eval-lm", data, *COMMON, "--path", ckpt, "--gen-subset", "valid",
                 "--batch-size", "16", "--sample-break-mode", "eos", "--tokens-per-sample", "64")
    m = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", out)
    assert m, out[-2000:]
    loss, ppl = float(m.group(1)), float(m.group(2))
    assert abs(ppl - 2 ** loss) <= 0.01 * ppl
    assert abs(loss - valid_losses(log)[-1]) <= 0.0015  # same sentences, same checkpoint
    n_tokens = int(re.search(r"Evaluated (\d+) tokens", out).group(1))
    raw = (data.parent / "mt_raw" / "valid.en").read_text().split("\n")[:-1]
    assert n_tokens == sum(len(s.split()) + 1 for s in raw)  # every word and every EOS


def test_bptt_task_trains_and_eval_lm_carries_the_state(work, lm_model):
    """--task bptt_language_modeling through fairseq-train and fairseq-eval-lm: one update
    per segment of the streams, and the perplexity fairseq-eval-lm prints equals one
    forward pass over each whole stream of the validation text, computed here."""
    from fairseq import checkpoint_utils

    import grnn_fairseq  # noqa: F401  (the checkpoint's model, and its safe loading)

    data, _, _ = lm_model
    save = work / "bptt_ckpt"
    streams, length = 4, 8
    task = ["--task", "bptt_language_modeling", "--tokens-per-sample", str(length)]
    _, log = run("train", data, *TRAIN, *task, "--batch-size", str(streams),
                 "--arch", "restricted_lstm_lm", "--decoder-embed-dim", "16",
                 "--decoder-hidden-size", "16", "--decoder-layers", "2", "--max-epoch", "1",
                 "--save-dir", save)
    dictionary = Dictionary.load(str(data / "dict.txt"))

    def tokens(split):
        lines = (work / "mt_raw" / f"{split}.en").read_text().splitlines()
        return torch.cat([dictionary.encode_line(x, add_if_not_exist=False) for x in lines])

    per = (tokens("train").numel() - 1) // streams
    assert f"num_updates {math.ceil(per / length)}" in log, log[-3000:]

    _, out = run("eval-lm", data, *COMMON, *task, "--path", save / "checkpoint_last.pt",
                 "--gen-subset", "valid", "--batch-size", "3")
    loss = float(re.search(r"Loss \(base 2\): ([\d.]+)", out).group(1))
    valid = tokens("valid")
    per = (valid.numel() - 1) // 3
    inputs, targets = valid[:3 * per].view(3, per), valid[1:3 * per + 1].view(3, per)
    models, _ = checkpoint_utils.load_model_ensemble([str(save / "checkpoint_last.pt")])
    model = models[0].eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs)[0].double(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).mean().item()
    assert f"Evaluated {3 * per:,} tokens" in out
    assert abs(loss - nll / math.log(2)) < 1e-4, (loss, nll / math.log(2))


def test_rnnsearch_with_language_modeling_task_fails_before_training(lm_model):
    data, _, _ = lm_model
    code, out = run("train", data, *TRAIN, "--task", "language_modeling", "--arch", "rnnsearch",
                    "--max-epoch", "1", "--batch-size", "8", "--save-dir", data.parent / "bad",
                    check=False)
    assert code == 1
    # one error line, as argparse prints a bad option, not fairseq's traceback (errors.py)
    assert re.search(r"^\S+: error: --arch=rnnsearch: .*--task translation", out,
                     re.M), out[-2000:]
    assert "Traceback" not in out
    assert "Start iterating" not in out and "begin training" not in out


# --------------------------------------------------------------------------- summarization
def test_summarization_generate_rouge(work):
    import grnn_fairseq  # noqa: F401
    from fairseq.scoring import SCORER_REGISTRY

    if "rouge" not in SCORER_REGISTRY:
        pytest.skip("grnn_fairseq.scoring registers no 'rouge' scorer yet")
    rng = random.Random(1)
    raw = work / "summ_raw"
    raw.mkdir()
    for split, n in (("train", 200), ("valid", 20), ("test", 20)):
        src = [[rng.choice(WORDS) for _ in range(rng.randint(8, 14))] for _ in range(n)]
        write_lines(raw / f"{split}.src", [" ".join(s) for s in src])
        write_lines(raw / f"{split}.tgt", [" ".join(s[:3]) for s in src])
    dest = work / "summ_bin"
    run("preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
        "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
        "--destdir", dest, "--workers", "1")
    save = work / "summ_ckpt"
    # a Gigaword architecture: all embeddings shared (joined dictionary), K=2
    run("train", dest, *TRAIN, "--arch", "group_rnnsearch_gigaword_k2", *TINY_MT,
        "--max-epoch", "1", "--batch-size", "16", "--save-dir", save)
    _, out = run("generate", dest, *COMMON, "--path", save / "checkpoint_last.pt", "--beam", "5",
                 "--batch-size", "16", "--scoring", "rouge")
    m = re.search(r"ROUGE-1 ([\d.]+) ROUGE-2 ([\d.]+) ROUGE-L ([\d.]+)", out)
    assert m, out[-2000:]
    assert all(0.0 <= float(x) <= 100.0 for x in m.groups())
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 20


# --------------------------------------------------------------------------- resume
def test_resume_after_sigkill(work, mt_data, reference_run):
    save = work / "resume_ckpt"
    cmd = command("train") + [str(a) for a in (mt_data, *EXACT, "--update-freq", "2",
                                               "--save-dir", save, "--save-interval-updates", "2",
                                               "--log-interval", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env())
    first = []
    try:
        for line in proc.stdout:  # fairseq logs to stdout, one flush per record
            first.append(line)
            if "Saved checkpoint" in line:  # logged after checkpoint_last.pt is complete
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(first)[-3000:]
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    n = saved["optimizer_history"][-1]["num_updates"]
    assert 2 <= n < EXACT_UPDATES

    _, log = run("train", mt_data, *EXACT, "--update-freq", "2", "--save-dir", save,
                 "--save-interval-updates", "2", "--log-interval", "1")
    loaded = re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ (\d+) updates\)", log)
    assert loaded and int(loaded.group(1)) == n, log[-3000:]
    updates = [int(u) for u in re.findall(r"num_updates=(\d+)", log)]
    assert updates == list(range(n + 1, EXACT_UPDATES + 1)), updates
    # and the resumed run ends where an uninterrupted one does
    assert max_weight_diff(load_weights(save / "checkpoint_last.pt"), reference_run) < 1e-6


# --------------------------------------------------------------------------- two processes
def _two_processes(mt_data, save, extra, base=EXACT):
    """fairseq's distributed engine on CPU: two ranks, gloo, started by hand.

    fairseq 0.12 cannot start CPU ranks itself: its spawn path uses
    ``nprocs=torch.cuda.device_count()`` (0 here) and the torchrun path divides by it.
    Explicit --distributed-init-method/--distributed-rank/--distributed-no-spawn is
    the supported way (one command per rank, as on several machines)."""
    port = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        log = open(save.parent / f"{save.name}_rank{rank}.log", "w+")
        cmd = command("train") + [str(a) for a in (
            mt_data, *base, "--save-dir", save, "--distributed-world-size", "2",
            "--distributed-rank", rank, "--distributed-backend", "gloo",
            "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
            "--device-id", "0", *extra)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env()))
        logs.append(log)
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return codes, texts


def _check_two_processes(codes, logs, save, reference_run):
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "training on 2 devices" in logs[0]
    assert "distributed init (rank 1)" in logs[1]
    assert f"num_updates {EXACT_UPDATES}" in logs[0]
    # each update all-reduces the gradients of the same two batches that one process
    # accumulates with --update-freq 2
    assert max_weight_diff(load_weights(save / "checkpoint_last.pt"), reference_run) < 1e-6


def test_two_gloo_processes_legacy_ddp_equal_update_freq_2(work, mt_data, reference_run):
    """Data parallel over 2 CPU processes with fairseq's own all-reduce (legacy_ddp)."""
    save = work / "ddp_legacy"
    codes, logs = _two_processes(mt_data, save, ["--ddp-backend", "legacy_ddp"])
    _check_two_processes(codes, logs, save, reference_run)


def test_two_gloo_processes_pytorch_ddp_equal_update_freq_2(work, mt_data, reference_run):
    """The default --ddp-backend pytorch_ddp: torch DDP with find_unused_parameters=False,
    which fails unless every parameter gets a gradient in every step.  Plain fairseq-train:
    grnn_fairseq.compat drops the device_ids fairseq passes to DDP for CPU modules."""
    save = work / "ddp_torch"
    codes, logs = _two_processes(mt_data, save, ["--ddp-backend", "pytorch_ddp"])
    _check_two_processes(codes, logs, save, reference_run)
    assert "find_unused_parameters': False" in logs[0]


# --------------------------------------------------------------------------- multilingual
def test_multilingual_task_learns_both_pairs(work):
    """fairseq's translation_multi_simple_epoch (one model for de-en and fr-en, language
    tokens on both sides): the same source words are reversed from de and copied from fr,
    so both pairs translate perfectly only if the source language token reaches the model."""
    raw = work / "ml_raw"
    splits = (("train", 600), ("test", 20), ("valid", 20))
    write_reversal_corpus(raw / "de", splits, WORDS[:20], max_len=8, seed=1)
    write_reversal_corpus(raw / "fr", splits, WORDS[:20], max_len=8, seed=2, src_lang="fr",
                          reverse=False)
    write_lines(raw / "dict.txt", [f"{w} 1" for w in WORDS[:20] + [f"t{i}" for i in range(20)]])
    dest = work / "ml_bin"
    for lang in ("de", "fr"):
        run("preprocess", "--source-lang", lang, "--target-lang", "en", "--srcdict",
            raw / "dict.txt", "--tgtdict", raw / "dict.txt", "--destdir", dest, "--workers", "1",
            *[x for split, _ in splits for x in (f"--{split}pref", raw / lang / split)])
    task = ["--task", "translation_multi_simple_epoch", "--lang-pairs", "de-en,fr-en",
            "--encoder-langtok", "src", "--decoder-langtok"]
    save = work / "ml_ckpt"
    sizes = [x for opt in ("encoder-embed-dim", "encoder-hidden-size", "decoder-embed-dim",
                           "decoder-hidden-size", "attention-dim") for x in (f"--{opt}", "32")]
    _, log = run("train", dest, *TRAIN, *task, "--arch", "group_rnnsearch_k2", *sizes,
                 "--encoder-layers", "1", "--decoder-layers", "1", "--dropout", "0",
                 "--batch-size", "8", "--max-epoch", "10", "--save-dir", save)
    assert "model: RNNSearchModel" in log and "done training" in log, log[-3000:]
    for lang in ("de", "fr"):
        _, out = run("generate", dest, *COMMON, *task, "--source-lang", lang,
                     "--target-lang", "en", "--path", save / "checkpoint_last.pt", "--beam", "5",
                     "--batch-size", "8", "--required-batch-size-multiple", "1")
        assert out.count("\nH-") == 20, out[-2000:]
        bleu = re.search(r"BLEU4 = ([\d.]+)", out)
        assert bleu and float(bleu.group(1)) > 80, (lang, out[-2000:])


# --------------------------------------------------------------------------- Hydra config
def test_hydra_train_yaml_equals_command_line(work, mt_data, reference_run):
    """fairseq-hydra-train with a YAML config (model._name: our architecture, options in
    snake_case, --user-dir as common.user_dir) trains exactly what fairseq-train does with
    the same options on the command line: our architecture defaults fill the same gaps."""
    save = work / "hydra_ckpt"
    model = dict(zip((a[2:].replace("-", "_") for a in TINY_MT[::2]), TINY_MT[1::2]))
    config = "\n".join([
        "common: {user_dir: %s, cpu: true, seed: 1, log_format: simple, no_progress_bar: true}"
        % USER_DIR,
        "task: {_name: translation, data: %s}" % mt_data,
        "model: {_name: group_rnnsearch_k2, dropout: 0.0, %s}"
        % ", ".join(f"{k}: {v}" for k, v in model.items()),
        "criterion: {_name: cross_entropy}",
        "optimizer: {_name: adam}",
        "lr_scheduler: {_name: fixed}",
        "optimization: {lr: [0.01], max_epoch: 1, update_freq: [2]}",
        "dataset: {batch_size: 10, required_batch_size_multiple: 1, num_workers: 0}",
        "checkpoint: {save_dir: %s, no_epoch_checkpoints: true}" % save,
        ""])
    (work / "hydra.yaml").write_text(config)
    _, log = run("hydra-train", "--config-dir", work, "--config-name", "hydra",
                 f"hydra.run.dir={work / 'hydra_out'}")
    assert f"num_updates {EXACT_UPDATES}" in log, log[-3000:]
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert saved["cfg"]["model"]["encoder_groups"] == 2
    assert max_weight_diff(saved["model"], reference_run) < 1e-6
    # its checkpoint (a model-only config) loads in fairseq-generate
    _, out = run("generate", mt_data, *COMMON, "--path", save / "checkpoint_last.pt",
                 "--beam", "2", "--batch-size", "16", "--required-batch-size-multiple", "1")
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == N_TEST, out[-2000:]
    # a misspelled model option stops the run before training, naming the right one
    code, out = run("hydra-train", "--config-dir", work, "--config-name", "hydra",
                    f"hydra.run.dir={work / 'hydra_typo'}", "+model.encoder_group=4",
                    f"checkpoint.save_dir={work / 'hydra_typo_ckpt'}", check=False)
    assert code != 0 and "'encoder_group' (did you mean 'encoder_groups'?)" in out, out[-3000:]
    assert "begin training" not in out


def test_bptt_two_gloo_processes_equal_one_process_with_all_streams(work, lm_model):
    """bptt_language_modeling on 2 processes of 2 streams each: each reads its own streams
    in order, so the run equals one process reading all 4 streams as one batch."""
    data, _, _ = lm_model
    base = TRAIN + ["--task", "bptt_language_modeling", "--tokens-per-sample", "8",
                    "--arch", "restricted_lstm_lm", "--decoder-embed-dim", "16",
                    "--decoder-hidden-size", "16", "--decoder-layers", "2", "--dropout", "0",
                    "--max-epoch", "1"]
    one = work / "bptt_one"
    _, log = run("train", data, *base, "--batch-size", "4", "--save-dir", one)
    updates = re.findall(r"num_updates (\d+)", log)[-1]
    two = work / "bptt_two"
    codes, logs = _two_processes(data, two, ["--batch-size", "2"], base=base)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "training on 2 devices" in logs[0] and f"num_updates {updates}" in logs[0]
    diff = max_weight_diff(load_weights(two / "checkpoint_last.pt"),
                           load_weights(one / "checkpoint_last.pt"))
    assert diff < 1e-4, diff  # rounding: one 4-row batch vs two 2-row ones (wrong streams: 0.9)


# --------------------------------------------------------------------------- Python API
def test_python_api_translate_matches_interactive(mt_data, mt_model):
    """fairseq's hub interface (``RNNSearchModel.from_pretrained(...).translate``) gives
    what fairseq-interactive prints for the same checkpoint, beam and sentences."""
    from grnn_fairseq.models.rnnsearch import RNNSearchModel

    ckpt, _ = mt_model
    lines = ["s1 s2 s3", "s4 s5 s6 s7 s8", "s9 s10 s9 s10 s11 s12"]
    _, out = run("interactive", mt_data, *COMMON, "--path", ckpt, "--beam", "5",
                 "--source-lang", "de", "--target-lang", "en", "--batch-size", "3",
                 "--buffer-size", "3",
                 stdin="\n".join(lines) + "\n")
    expected = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", out, re.M))
    assert len(expected) == len(lines), out[-3000:]
    model = RNNSearchModel.from_pretrained(str(ckpt.parent), checkpoint_file=ckpt.name,
                                           data_name_or_path=str(mt_data))
    model.eval()
    got = model.translate(lines, beam=5)
    assert got == [expected[str(i)] for i in range(len(lines))]
    assert model.translate(lines[1], beam=5) == expected["1"]  # one sentence, one string


def test_python_api_lm_scores_match_eval_lm(lm_model):
    """``RecurrentLanguageModel.from_pretrained(...).score`` gives the per-word
    log-probabilities that fairseq-eval-lm --output-word-probs prints (the hub scores a
    sentence's words, not its end of sentence)."""
    from grnn_fairseq.models.rnn_lm import RecurrentLanguageModel

    data, ckpt, _ = lm_model
    _, out = run("eval-lm", data, *COMMON, "--path", ckpt, "--gen-subset", "valid",
                 "--batch-size", "16", "--sample-break-mode", "eos", "--tokens-per-sample", "64",
                 "--output-word-probs")
    printed = {}  # sentence id -> [(word, natural log-probability)], </s> included
    for sid, rest in re.findall(r"eval_lm\W+(\d+) (\S+ \[-?[\d.]+\].*)$", out, re.M):
        printed[int(sid)] = [(w, float(p)) for w, p in re.findall(r"(\S+) \[(-?[\d.]+)\]", rest)]
    raw = (data.parent / "mt_raw" / "valid.en").read_text().split("\n")[:-1]
    assert sorted(printed) == list(range(len(raw))), out[-3000:]
    lm = RecurrentLanguageModel.from_pretrained(str(ckpt.parent), checkpoint_file=ckpt.name,
                                                data_name_or_path=str(data))
    lm.eval()
    for i, scored in enumerate(lm.score(raw)):
        words = raw[i].split()
        assert [w for w, _ in printed[i]] == words + ["</s>"]
        expected = torch.tensor([p for _, p in printed[i][:-1]], dtype=torch.float64)
        assert torch.allclose(scored["positional_scores"].double(), expected, atol=2e-5), i


def test_generate_diverse_beam_groups(mt_data, mt_model):
    """--diverse-beam-groups through fairseq-generate, in batches after the first (fairseq
    0.12.3 alone stops there with an IndexError; grnn_fairseq.compat fixes it)."""
    ckpt, _ = mt_model
    _, out = run("generate", mt_data, *COMMON, "--path", ckpt, "--beam", "4", "--nbest", "4",
                 "--diverse-beam-groups", "2", "--batch-size", "8",
                 "--required-batch-size-multiple", "1")
    ids = re.findall(r"^H-(\d+)\t", out, re.M)
    assert sorted(set(int(i) for i in ids)) == list(range(N_TEST)), out[-2000:]
    assert len(ids) == 4 * N_TEST


def test_generate_with_our_lm_fused(mt_data, mt_model, lm_model):
    """Shallow fusion (--lm-path, --lm-weight) with our recurrent LM, trained on the same
    target side: every sentence is translated, and the LM changes the scores."""
    ckpt, _ = mt_model
    data, lm_ckpt, _ = lm_model
    assert (data / "dict.txt").read_text() == (mt_data / "dict.en.txt").read_text()
    # fairseq loads the LM with the translation data folder, where it reads dict.txt
    fused_data = mt_data.parent / "mt_bin_lm"
    if not fused_data.exists():
        shutil.copytree(mt_data, fused_data)
        shutil.copy(data / "dict.txt", fused_data / "dict.txt")
    args = (fused_data, *COMMON, "--path", ckpt, "--beam", "5", "--batch-size", "8",
            "--required-batch-size-multiple", "1")
    _, plain = run("generate", *args)
    _, fused = run("generate", *args, "--lm-path", lm_ckpt, "--lm-weight", "0.5")

    def scores(out):
        return {int(i): float(s) for i, s in re.findall(r"^H-(\d+)\t(\S+)\t", out, re.M)}

    a, b = scores(plain), scores(fused)
    assert sorted(b) == sorted(a) == list(range(N_TEST)), fused[-2000:]
    assert all(math.isfinite(x) for x in b.values())
    assert a != b


def _lm_generate(data, ckpt, *extra):
    """fairseq-generate --task language_modeling: each test sentence's first two words as
    the prefix; -> {(sentence id, hypothesis): per-token scores (base 2, </s> last)}."""
    _, out = run("generate", data, *COMMON, "--path", ckpt, "--task", "language_modeling",
                 "--gen-subset", "valid", "--sample-break-mode", "eos", "--tokens-per-sample",
                 "64", "--prefix-size", "2", "--batch-size", "16", *extra)
    found = re.findall(r"^H-(\d+)\t\S+\t(.*)\n(?:D-.*\n)?P-\1\t(.*)$", out, re.M)
    assert found, out[-3000:]
    return {(int(i), hyp): [float(p) for p in scores.split()] for i, hyp, scores in found}


def test_lm_generation_scores_equal_a_full_forward_over_the_hypothesis(lm_model):
    """Beam search from a language model (incremental decoding, the state reordered
    between beams) prints per-token scores that equal the hub's teacher-forced scores of
    the same word sequence (one forward pass over the whole hypothesis)."""
    from grnn_fairseq.models.rnn_lm import RecurrentLanguageModel

    data, ckpt, _ = lm_model
    hyps = _lm_generate(data, ckpt, "--beam", "3", "--nbest", "3")
    assert len(hyps) == 3 * N_VALID
    lm = RecurrentLanguageModel.from_pretrained(str(ckpt.parent), checkpoint_file=ckpt.name,
                                                data_name_or_path=str(data))
    lm.eval()
    keys = sorted(hyps)
    for key, scored in zip(keys, lm.score([hyp for _, hyp in keys])):
        printed = torch.tensor(hyps[key][:-1], dtype=torch.float64)  # </s> not scored
        expected = scored["positional_scores"].double() / math.log(2)
        assert torch.allclose(printed, expected, atol=2e-4), (key, printed, expected)


def test_generate_retain_dropout_samples_dropout_masks(mt_data, mt_model):
    """--retain-dropout keeps the model's dropout (0.3 for the IWSLT-sized archs) on during
    generation, as for fairseq's own models (FairseqDropout): scores change, and change with
    the seed; --retain-dropout-modules naming none of our modules leaves the model as it is.
    (Our nn.Dropout modules ignored the option: every run printed the deterministic output.)"""
    ckpt, _ = mt_model
    args = (mt_data, *COMMON, "--path", ckpt, "--beam", "5", "--batch-size", "16")

    def scores(*extra):
        _, out = run("generate", *args, *extra)
        found = {int(i): (float(s), h) for i, s, h in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", out, re.M)}
        assert sorted(found) == list(range(N_TEST)), out[-2000:]
        return found

    plain = scores()
    assert scores("--retain-dropout", "--retain-dropout-modules", "LSTMDecoder") == plain
    seed1, seed2 = (scores("--retain-dropout", "--seed", s) for s in ("1", "2"))
    for kept in (seed1, seed2):
        changed = sum(kept[i][0] != plain[i][0] for i in plain)
        assert changed == N_TEST, f"dropout kept on changed {changed} of {N_TEST} scores"
    assert seed1 != seed2


def test_no_repeat_ngram_size_through_generate(work):
    """--no-repeat-ngram-size 2 through fairseq-generate on the CPU. A model that copies
    its source (trained here, about 20 s) copies test sources that hold a bigram twice,
    repeating it; with the option no hypothesis holds a bigram twice (fairseq 0.12's CPU
    path blocked nothing; test_compat.py checks the banned tokens themselves)."""
    raw, dest, save = work / "copy_raw", work / "copy_bin", work / "copy_ckpt"
    write_reversal_corpus(raw, (("train", 600), ("valid", 20)), WORDS[:20], max_len=8,
                          reverse=False)
    rng = random.Random(5)
    tests = [rng.sample(WORDS[:20], 4) for _ in range(20)]
    tests = [[a, b, c, a, b, d] for a, b, c, d in tests]  # a b twice
    write_lines(raw / "test.de", [" ".join(t) for t in tests])
    write_lines(raw / "test.en", [" ".join("t" + w[1:] for w in t) for t in tests])
    run("preprocess", "--source-lang", "de", "--target-lang", "en", "--trainpref", raw / "train",
        "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir", dest,
        "--workers", "1")
    sizes = [x for opt in ("encoder-embed-dim", "encoder-hidden-size", "decoder-embed-dim",
                           "decoder-hidden-size", "attention-dim") for x in (f"--{opt}", "32")]
    run("train", dest, *TRAIN, "--arch", "group_rnnsearch_k2", *sizes, "--encoder-layers", "1",
        "--decoder-layers", "1", "--dropout", "0", "--batch-size", "8", "--max-epoch", "6",
        "--save-dir", save)

    def repeats(*extra):
        _, out = run("generate", dest, *COMMON, "--path", save / "checkpoint_last.pt",
                     "--beam", "5", "--batch-size", "20", *extra)
        hyps = re.findall(r"^H-\d+\t\S+\t(.*)$", out, re.M)
        assert len(hyps) == len(tests), out[-2000:]
        return sum(len(b) != len(set(b)) for b in
                   (list(zip(h.split(), h.split()[1:])) for h in hyps))

    assert repeats() >= 15
    assert repeats("--no-repeat-ngram-size", "2") == 0


# --------------------------------------------------------------------------- tied weights
def test_checkpoint_refuses_another_rearrangement(work, mt_data, mt_model):
    """A checkpoint trained with groups and rearrangement 'both' (1 layer: the shuffle between
    time steps) does not load into the same model without it: --model-overrides at
    generation and --finetune-from-model fail and name the option.  Weight shapes are the
    same, so before the stacks recorded their rearrangement this ran and gave nonsense.  A
    checkpoint saved before the record existed still loads and translates as before."""
    ckpt, _ = mt_model
    gen = [*COMMON, "--beam", "2", "--batch-size", "16"]
    code, out = run("generate", mt_data, *gen, "--path", ckpt,
                    "--model-overrides", "{'rearrangement': 'none'}", check=False)
    assert code != 0 and "built with rearrangement='none'" in out, out[-2000:]
    assert "--rearrangement both" in out and "Traceback" not in out, out[-2000:]
    code, out = run("train", mt_data, *TRAIN, "--max-epoch", "1", "--batch-size", "16",
                    "--arch", "group_rnnsearch_k2", *TINY_MT, "--rearrangement", "none",
                    "--finetune-from-model", ckpt, "--save-dir", work / "mt_none_ft", check=False)
    assert code != 0 and "built with rearrangement='none'" in out, out[-2000:]
    assert "(raised while: Exception: Cannot load model parameters" in out, out[-2000:]

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    dropped = [k for k in state["model"] if k.endswith(".shuffles")]
    assert dropped  # the encoder's and the decoder's stacks
    for k in dropped:
        del state["model"][k]
    legacy = work / "mt_legacy.pt"
    torch.save(state, legacy)
    hyps = [re.findall(r"^H-\d+\t.*$", run("generate", mt_data, *gen, "--path", path)[1], re.M)
            for path in (ckpt, legacy)]
    assert hyps[0] and sorted(hyps[0]) == sorted(hyps[1])


def test_tied_model_refuses_untied_checkpoint(work, mt_data, lm_model):
    """A checkpoint trained with untied decoder embeddings, loaded into a model that ties them
    (--finetune-from-model, --model-overrides), is refused, as fairseq's own lstm refuses it
    ("Unexpected key(s)": its tied model has no separate output layer). Ours holds the tied
    parameter under both names, and torch's load_state_dict used to copy the output
    projection over the embeddings without a word."""
    one_epoch = [*TRAIN, "--max-epoch", "1", "--batch-size", "16"]
    untied = work / "mt_untied"
    run("train", mt_data, *one_epoch, "--arch", "group_rnnsearch_k2", *TINY_MT,
        "--no-share-decoder-input-output-embed", "--save-dir", untied)
    ckpt = untied / "checkpoint_last.pt"
    weights = load_weights(ckpt)
    assert not torch.equal(weights["decoder.embed_tokens.weight"],
                           weights["decoder.output_projection.weight"])
    # group_rnnsearch_k2 ties by default (IWSLT sizes)
    code, out = run("train", mt_data, *one_epoch, "--arch", "group_rnnsearch_k2", *TINY_MT,
                    "--finetune-from-model", ckpt, "--save-dir", work / "mt_tied_ft", check=False)
    assert code != 0 and "which this model ties" in out, out[-2000:]
    code, out = run("generate", mt_data, *COMMON, "--path", ckpt, "--beam", "2", "--batch-size",
                    "16", "--model-overrides", "{'share_decoder_input_output_embed': True}",
                    check=False)
    assert code != 0 and "which this model ties" in out, out[-2000:]
    # the options it was trained with still fine-tune it, and untying a tied checkpoint is fine
    run("train", mt_data, *one_epoch, "--arch", "group_rnnsearch_k2", *TINY_MT,
        "--no-share-decoder-input-output-embed", "--finetune-from-model", ckpt,
        "--save-dir", work / "mt_untied_ft")

    # the language model: the lm_model fixture ties; an untied one must not load tied
    data, _, _ = lm_model
    lm_untied = work / "lm_untied"
    run("train", data, *TRAIN, "--task", "language_modeling", "--sample-break-mode", "eos",
        "--tokens-per-sample", "64", "--arch", "restricted_lstm_lm", "--decoder-embed-dim", "16",
        "--decoder-hidden-size", "16", "--decoder-layers", "1", "--max-epoch", "1",
        "--batch-size", "16", "--save-dir", lm_untied)
    code, out = run("eval-lm", data, *COMMON, "--path", lm_untied / "checkpoint_last.pt",
                    "--gen-subset", "valid", "--batch-size", "16", "--sample-break-mode", "eos",
                    "--tokens-per-sample", "64",
                    "--model-overrides", "{'share_decoder_input_output_embed': True}", check=False)
    assert code != 0 and "which this model ties" in out, out[-2000:]


def test_lm_checkpoint_or_other_sharing_rate_fails_with_one_line(mt_data, mt_model, lm_model):
    """A language model given to fairseq-generate / fairseq-interactive on translation data
    used to print unconditioned LM samples (exit 0), and fairseq-train with an LM arch and
    --task translation failed deep in fairseq (TypeError); a translation checkpoint loaded
    with another --sharing-rate ended in torch's "Missing key(s)" traceback."""
    _, lm_ckpt, _ = lm_model
    mt_ckpt, _ = mt_model
    gen = [*COMMON, "--beam", "2", "--batch-size", "16"]
    lm_message = (r"^\S+: error: --arch=restricted(_lstm)?_lm: a language model .* --task "
                  r"language_modeling")
    code, out = run("generate", mt_data, *gen, "--path", lm_ckpt, check=False)
    assert code == 1 and re.search(lm_message, out, re.M), out[-2000:]
    assert "Traceback" not in out and not re.search(r"^H-\d", out, re.M)
    code, out = run("interactive", mt_data, *COMMON, "--path", lm_ckpt, "--beam", "2",
                    stdin="s1 s2 s3\n", check=False)
    assert code == 1 and re.search(lm_message, out, re.M), out[-2000:]
    code, out = run("train", mt_data, *TRAIN, "--arch", "restricted_lm", "--decoder-embed-dim",
                    "16", "--decoder-hidden-size", "16", "--max-update", "1", "--batch-size", "8",
                    "--save-dir", mt_data.parent / "lm_on_mt", check=False)
    assert code == 1 and re.search(lm_message, out, re.M), out[-2000:]
    assert "Traceback" not in out

    code, out = run("generate", mt_data, *gen, "--path", mt_ckpt,
                    "--model-overrides", "{'sharing_rate': 0.5}", check=False)
    assert code == 1 and "Traceback" not in out, out[-2000:]
    assert re.search(r"^\S+: error: the checkpoint does not fit this model: .*its recurrent "
                     r"layers are standard \(--sharing-rate 0\) and this model's restricted",
                     out, re.M), out[-2000:]
