"""grnn_fairseq.scoring: ROUGE scorer for fairseq-generate and the grnn-rouge CLI."""
import json
import os
import re
import subprocess
import sys

import pytest

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
from grnn_fairseq import scoring  # noqa: E402

PAIRS = [  # (reference, hypothesis)
    ("the cat sat on the mat", "the cats were sitting on a mat"),
    ("police killed the gunman", "the gunman was shot down by police"),
    ("Running fast, he won the race!", "he runs fast and won a race"),
    ("a b c d e f", "f e d c b a"),
    ("identical sentence here", "identical sentence here"),
]


def _direct(pairs):
    s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for ref, hyp in pairs:
        scores = s.score(ref, hyp)
        for k in out:
            out[k] += scores[k].fmeasure
    return {k: 100 * v / len(pairs) for k, v in out.items()}


def test_hand_computed_rouge1():
    # overlap {a, b}: P = 2/3, R = 2/4, F1 = 2PR / (P + R) = 4/7
    got = scoring.rouge(["a b c d"], ["a b e"])
    assert got["rouge1"] == pytest.approx(400 / 7)
    assert got["rouge2"] == pytest.approx(100 * 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


def test_matches_rouge_score_called_directly():
    got = scoring.rouge([r for r, _ in PAIRS], [h for _, h in PAIRS])
    want = _direct(PAIRS)
    for key in scoring.ROUGE_TYPES:
        assert got[key] == pytest.approx(want[key], abs=1e-9)
    assert 0 < got["rouge2"] < got["rouge1"] < 100


def test_empty_hypotheses_and_corpus():
    got = scoring.rouge(["the cat sat", "a dog"], ["", "a dog"])
    assert got == pytest.approx({"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0})
    assert scoring.rouge([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    zeros = "ROUGE-1 0.00 ROUGE-2 0.00 ROUGE-L 0.00"
    assert scoring.format_scores(scoring.rouge([""], [""])) == zeros
    with pytest.raises(ValueError):
        scoring.rouge(["a"], [])


def test_fairseq_scorer_registered_as_rouge():
    fairseq_scoring = pytest.importorskip("fairseq.scoring")
    registry = fairseq_scoring.SCORER_REGISTRY
    # ours, not a fairseq scorer of the same name (the registration would then be skipped)
    assert registry["rouge"] is scoring.RougeScorer
    assert [n for n, c in registry.items() if c.__module__.startswith("fairseq.")
            and n == "rouge"] == []

    scorer = fairseq_scoring.build_scorer("rouge", None)
    for ref, hyp in PAIRS + [("nothing matches", "")]:
        scorer.add_string(ref, hyp)  # generate passes detokenized strings
    want = _direct(PAIRS + [("nothing matches", "")])
    text = scorer.result_string()
    assert re.fullmatch(r"ROUGE-1 \d+\.\d\d ROUGE-2 \d+\.\d\d ROUGE-L \d+\.\d\d", text)
    assert text == scoring.format_scores(want)
    assert scorer.score() == pytest.approx(want["rougeL"])
    assert scorer.score("rouge1") == pytest.approx(want["rouge1"])


@pytest.fixture
def files(tmp_path):
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("".join(r + "\n" for r, _ in PAIRS), encoding="utf-8")
    hyp.write_text("".join(h + "\n" for _, h in PAIRS), encoding="utf-8")
    return ref, hyp


def test_cli(files, capsys):
    ref, hyp = files
    assert scoring.main(["--ref", str(ref), "--hyp", str(hyp)]) == 0
    assert capsys.readouterr().out.strip() == scoring.format_scores(_direct(PAIRS))
    assert scoring.main(["--ref", str(ref), "--hyp", str(hyp), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ROUGE-1"] == pytest.approx(_direct(PAIRS)["rouge1"], abs=1e-4)


def test_cli_empty_line_is_an_empty_hypothesis(tmp_path, capsys):
    (tmp_path / "r").write_text("the cat sat\na dog\n")
    (tmp_path / "h").write_text("\na dog\n")
    scoring.main(["--ref", str(tmp_path / "r"), "--hyp", str(tmp_path / "h")])
    assert capsys.readouterr().out.strip() == "ROUGE-1 50.00 ROUGE-2 50.00 ROUGE-L 50.00"


def test_cli_errors(files, tmp_path, capsys):
    ref, hyp = files
    short = tmp_path / "short.txt"
    short.write_text("one line\n")
    with pytest.raises(SystemExit) as err:
        scoring.main(["--ref", str(ref), "--hyp", str(short)])
    assert err.value.code == 2
    assert f"has {len(PAIRS)} lines" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        scoring.main(["--ref", str(tmp_path / "missing.txt"), "--hyp", str(hyp)])
    assert err.value.code == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        scoring.main(["--ref", str(tmp_path), "--hyp", str(hyp)])
    assert err.value.code == 2 and "is a directory" in capsys.readouterr().err
    # not text (a binarized file, another encoding): a message, not a UnicodeDecodeError
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Gr\u00fc\u00dfe\n".encode("latin-1") * len(PAIRS))
    with pytest.raises(SystemExit) as err:
        scoring.main(["--ref", str(ref), "--hyp", str(latin)])
    assert err.value.code == 2
    assert f"{latin} is not UTF-8 text (byte 0xfc at offset 2)" in capsys.readouterr().err


def test_python_m_entry_point(files):
    import grnn_fairseq

    ref, hyp = files
    parent = os.path.dirname(os.path.dirname(os.path.abspath(grnn_fairseq.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (parent, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "grnn_fairseq.scoring", "--ref", str(ref),
                           "--hyp", str(hyp)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == scoring.format_scores(_direct(PAIRS))
    assert "found in sys.modules" not in proc.stderr, proc.stderr[-2000:]  # runpy's warning
