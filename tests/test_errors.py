"""grnn_fairseq.errors: a ConfigError that ends a program prints as one error line (the
message that names the fix), anything else keeps Python's traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grnn_fairseq.errors import FULL_ERROR_ENV, ConfigError, short_message
from grnn_fairseq.weights import check_groups

ROOT = Path(__file__).resolve().parents[1]


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever was raised
        return exc
    raise AssertionError("nothing raised")


def test_short_message_names_the_cause_and_what_re_raised_it(monkeypatch):
    monkeypatch.delenv(FULL_ERROR_ENV, raising=False)
    cause = _raised(lambda: check_groups(3, width=8))
    assert isinstance(cause, ConfigError) and isinstance(cause, ValueError)
    assert short_message(cause, "fairseq-train") == (
        f"fairseq-train: error: {cause}\n  (set {FULL_ERROR_ENV}=1 for the traceback)\n")

    def reraise():  # as fairseq's trainer does with a checkpoint it cannot load
        try:
            check_groups(3, width=8)
        except Exception:
            raise Exception("Cannot load model parameters from checkpoint x.pt")
    wrapped = _raised(reraise)
    assert short_message(wrapped, "p").splitlines() == [
        f"p: error: {cause}",
        "  (raised while: Exception: Cannot load model parameters from checkpoint x.pt)",
        f"  (set {FULL_ERROR_ENV}=1 for the traceback)"]
    # not ours, or asked for in full: the usual traceback
    assert short_message(_raised(lambda: int("x")), "p") is None
    monkeypatch.setenv(FULL_ERROR_ENV, "1")
    assert short_message(cause, "p") is None


@pytest.mark.parametrize("code,full,short", [
    ("from grnn_fairseq.weights import check_groups; check_groups(3, width=8)", False, True),
    ("from grnn_fairseq.weights import check_groups; check_groups(3, width=8)", True, False),
    ("import grnn_fairseq; raise ValueError('a bug')", False, False),
])
def test_uncaught_errors_exit_1_with_or_without_traceback(code, full, short):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(FULL_ERROR_ENV, None)
    if full:
        env[FULL_ERROR_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert ("Traceback" in proc.stderr) is not short, proc.stderr
    if short:
        assert "\n-c: error: groups=3 does not divide width=8" in "\n" + proc.stderr, proc.stderr
