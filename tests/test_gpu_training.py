"""Half-precision training on a GPU through fairseq's own commands (skipped without CUDA).

``fairseq-train --fp16`` (fairseq's FP16Optimizer with dynamic loss scaling), ``--amp``
(torch autocast) and ``--bf16`` must train our models without NaN or Inf and reach about
the loss of the same run in fp32 (the reference). ``--fp16`` and ``--amp`` are CUDA-only in
fairseq, so CI skips this file; `scripts/gpu-checks.sh training` runs it on a GPU machine.
``--bf16`` on the CPU (the plugin decouples it from ``--tpu``) is tested in test_compat.py.

Data: made-up parallel sentences (the target is the source reversed, word by word renamed),
learnable in a few hundred updates; the models use the fused Triton engine (``auto`` on
CUDA) with groups and the time-step rearrangement.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic import write_reversal_corpus

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (fairseq's --fp16/--amp are CUDA-only)")

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "grnn_fairseq")
WORDS = [f"s{i}" for i in range(60)]
UPDATES = 400
MT = ["--arch", "group_rnnsearch_k4", "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
      "--encoder-hidden-size", "256", "--decoder-hidden-size", "256", "--attention-dim", "256",
      "--decoder-out-embed-dim", "128", "--dropout", "0.1"]
TRAIN = ["--user-dir", USER_DIR, "--optimizer", "adam", "--lr", "0.003", "--clip-norm", "1.0",
         "--max-tokens", "4000", "--max-update", str(UPDATES), "--log-format", "simple",
         "--log-interval", "25", "--seed", "1", "--no-epoch-checkpoints", "--no-progress-bar",
         "--validate-interval-updates", "100", "--num-workers", "0"]


def command(name):
    script = Path(sys.executable).parent / f"fairseq-{name}"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", f"fairseq_cli.{name.replace('-', '_')}"]


def run(name, *args):
    proc = subprocess.run(command(name) + [str(a) for a in args], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fairseq-{name} exited with {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu")
    raw = work / "raw"
    write_reversal_corpus(raw, (("train", 6000), ("valid", 200), ("test", 200)), WORDS, max_len=20)
    dest = work / "bin"
    run("preprocess", "--source-lang", "de", "--target-lang", "en", "--trainpref", raw / "train",
        "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir", dest,
        "--workers", "1")
    return work, dest


def losses(log, tag):
    """The loss values (base 2) of fairseq's `train_inner` or `valid` lines, in order."""
    if tag == "train_inner":
        found = re.findall(r"\| train_inner \|.*?loss=([^,\s]+)", log)
    else:
        found = re.findall(r"valid on 'valid' subset \| loss ([^\s|]+)", log)
    return [float(x) for x in found]


def train(data, name, *extra):
    work, dest = data
    save = work / name
    log = run("train", dest, *TRAIN, *MT, "--save-dir", save, *extra)
    assert "done training" in log, log[-3000:]
    return save / "checkpoint_last.pt", log


@pytest.fixture(scope="module")
def fp32_run(data):
    return train(data, "fp32")


# bf16 first: the likeliest choice on an H100, and the one the plugin had to fix
@pytest.mark.parametrize("precision", ["--bf16", "--fp16", "--amp"])
def test_half_precision_training_is_finite_and_matches_fp32(data, fp32_run, precision):
    _, ref_log = fp32_run
    _, log = train(data, precision.strip("-"), precision)
    assert "Minimum loss scale reached" not in log
    if precision == "--bf16":  # on the GPU, not fairseq's TPU path (grnn_fairseq.compat)
        assert "bfloat16 on the CUDA device" in log, log[-3000:]
    inner, valid = losses(log, "train_inner"), losses(log, "valid")
    assert len(inner) >= UPDATES // 25 - 1 and len(valid) >= UPDATES // 100
    assert all(math.isfinite(x) for x in inner + valid), inner + valid
    ref_valid = losses(ref_log, "valid")
    assert valid[-1] < 0.5 * valid[0], valid                 # it learns
    assert abs(valid[-1] - ref_valid[-1]) < 0.15 * ref_valid[-1] + 0.1, (valid, ref_valid)


def test_generate_in_fp16_translates(data, fp32_run):
    _, dest = data
    ckpt, _ = fp32_run
    out = run("generate", dest, "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", "test",
              "--beam", "5", "--batch-size", "64", "--fp16", "--required-batch-size-multiple", "1")
    assert "Translated 200 sentences" in out
    bleu = float(re.search(r"BLEU4 = ([\d.]+)", out).group(1))
    hyps = [line.split("\t")[2] for line in out.splitlines() if line.startswith("H-")]
    assert len(hyps) == 200 and bleu > 20, (bleu, hyps[:3])


def test_language_model_trains_in_fp16(data):
    work, dest = data
    lm_bin = work / "lm_bin"
    run("preprocess", "--only-source", "--trainpref", work / "raw" / "train.en", "--validpref",
        work / "raw" / "valid.en", "--testpref", work / "raw" / "test.en", "--destdir", lm_bin,
        "--workers", "1")
    log = run("train", lm_bin, "--task", "language_modeling", "--user-dir", USER_DIR,
              "--arch", "group_lstm_lm_k2", "--decoder-embed-dim", "256",
              "--decoder-hidden-size", "256", "--tokens-per-sample", "64",
              "--sample-break-mode", "none", "--batch-size", "32", "--optimizer", "adam",
              "--lr", "0.003", "--max-update", "300", "--fp16", "--log-format", "simple",
              "--log-interval", "25", "--save-dir", work / "lm_fp16", "--no-progress-bar",
              "--no-epoch-checkpoints", "--num-workers", "0")
    inner = losses(log, "train_inner")
    assert inner and all(math.isfinite(x) for x in inner), inner
    assert inner[-1] < inner[0] - 0.5, inner
