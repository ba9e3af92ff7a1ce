"""grnn_fairseq.average_checkpoints: exact means, checks, selection, safe and atomic I/O."""
import argparse
import collections
import importlib.util
import os
import re
import sys
import uuid

import pytest
import torch

pytest.importorskip("fairseq")
from grnn_fairseq import average_checkpoints as avg  # noqa: E402


def _tiny_mt_run(tmp_path_factory):
    """The session-cached fairseq run of test_compat.py (same helper, same cache)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_compat.py")
    spec = importlib.util.spec_from_file_location("_grnn_tests_compat_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.tiny_mt_run(tmp_path_factory)


@pytest.fixture(scope="session")
def mt_run(tmp_path_factory):
    return _tiny_mt_run(tmp_path_factory)


def _save(path, model, **rest):
    state = {"args": None, "cfg": {"model": argparse.Namespace(arch="toy")}, "model": model}
    state.update(rest)
    torch.save(state, path)
    return str(path)


def test_mean_of_two_equals_hand_computed(tmp_path):
    a = _save(tmp_path / "a.pt", collections.OrderedDict(
        w=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        h=torch.tensor([1.0, 2.0], dtype=torch.float16),
        steps=torch.tensor([7])), extra_state={"epoch": 1})
    b = _save(tmp_path / "b.pt", collections.OrderedDict(
        w=torch.tensor([[3.0, 6.0], [5.0, 0.0]]),
        h=torch.tensor([3.0, 5.0], dtype=torch.float16),
        steps=torch.tensor([9])), extra_state={"epoch": 2})
    out = tmp_path / "out" / "avg.pt"
    assert avg.main(["--inputs", a, b, "--output", str(out)]) == 0
    got = torch.load(out, weights_only=True)
    assert isinstance(got["model"], collections.OrderedDict)
    assert torch.equal(got["model"]["w"], torch.tensor([[2.0, 4.0], [4.0, 2.0]]))
    assert got["model"]["h"].dtype == torch.float16
    assert torch.equal(got["model"]["h"], torch.tensor([2.0, 3.5], dtype=torch.float16))
    assert torch.equal(got["model"]["steps"], torch.tensor([7]))  # non-float: first's
    assert got["extra_state"] == {"epoch": 1} and got["cfg"]["model"].arch == "toy"
    assert [p.name for p in out.parent.iterdir()] == ["avg.pt"]  # no temp file left


def test_real_checkpoints_average_and_generate(mt_run, tmp_path):
    helpers, run = mt_run
    c1, c2 = run / "ck" / "checkpoint1.pt", run / "ck" / "checkpoint2.pt"
    out = tmp_path / "avg.pt"
    assert avg.main(["--inputs", str(c1), str(c2), "--output", str(out)]) == 0
    s1, s2 = (torch.load(p, weights_only=True) for p in (c1, c2))
    got = torch.load(out, weights_only=True)
    assert got["model"].keys() == s1["model"].keys()
    assert any(not torch.equal(s1["model"][k], s2["model"][k]) for k in s1["model"])
    for key, t1 in s1["model"].items():
        if t1.is_floating_point():
            assert torch.allclose(got["model"][key], (t1 + s2["model"][key]) / 2, atol=1e-7)
    assert got["cfg"] == s1["cfg"]

    text = helpers._run([sys.executable, "-m", "fairseq_cli.generate", str(run / "data"),
                         "--user-dir", helpers.PLUGIN_DIR, "--dataset-impl", "raw",
                         "--task", "translation", "--path", str(out), "--gen-subset", "test",
                         "--beam", "2", "--max-len-b", "5", "--cpu", "--batch-size", "8",
                         "--scoring", "rouge"], cwd=tmp_path)
    assert "Translated 6 sentences" in text  # all of them (compat keeps the last batch)
    assert re.search(r"Generate test with beam=2: ROUGE-1 [\d.]+ ROUGE-2 [\d.]+ ROUGE-L [\d.]+",
                     text), text[-2000:]


def test_mismatched_keys_and_shapes_are_refused(tmp_path, capsys):
    a = _save(tmp_path / "a.pt", {"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    other_keys = _save(tmp_path / "k.pt", {"w": torch.zeros(2, 3), "c": torch.zeros(3)})
    other_shape = _save(tmp_path / "s.pt", {"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    out = tmp_path / "avg.pt"
    assert avg.main(["--inputs", a, other_keys, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "different parameters" in err and "'b'" in err and "'c'" in err
    assert avg.main(["--inputs", a, other_shape, "--output", str(out)]) == 1
    assert "'w' has shape (2, 3)" in capsys.readouterr().err
    assert not out.exists()


def test_output_folder_and_files_that_are_not_checkpoints_are_refused(tmp_path, capsys):
    """--output a folder used to fail after averaging (IsADirectoryError); a file that is not
    a checkpoint blamed weights_only."""
    a = _save(tmp_path / "a.pt", {"w": torch.zeros(2)})
    b = _save(tmp_path / "b.pt", {"w": torch.ones(2)})
    with pytest.raises(SystemExit) as err:
        avg.main(["--inputs", a, b, "--output", str(tmp_path)])
    assert err.value.code == 2
    assert f"--output {tmp_path} is a directory: give the file to write" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "a.pt").read_bytes()[:200])
    for bad in (text, truncated):
        assert avg.main(["--inputs", a, str(bad), "--output", str(tmp_path / "avg.pt")]) == 1
        err = capsys.readouterr().err
        assert f"cannot load {bad}: it is not a torch checkpoint, or it is truncated" in err, err
        assert "weights_only" not in err and "pass the checkpoint*.pt files" in err
    assert not (tmp_path / "avg.pt").exists()


def test_checkpoints_from_before_and_after_the_rearrangement_record_average(tmp_path):
    """A run resumed across the change that added RecurrentStack's ``shuffles`` record has
    checkpoints with and without it: they average (in either order), and the result keeps
    the record only if every input has it; any other missing key is still refused."""
    new = _save(tmp_path / "new.pt", {"w": torch.tensor([1.0, 2.0]),
                                      "decoder.rnn.shuffles": torch.tensor([0.0, 1.0])})
    old = _save(tmp_path / "old.pt", {"w": torch.tensor([3.0, 6.0])})
    out = tmp_path / "avg.pt"
    for inputs in ([new, old], [old, new]):
        assert avg.main(["--inputs", *inputs, "--output", str(out)]) == 0
        got = torch.load(out, weights_only=True)["model"]
        assert list(got) == ["w"] and torch.equal(got["w"], torch.tensor([2.0, 4.0]))
    assert avg.main(["--inputs", new, new, "--output", str(out)]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["model"]["decoder.rnn.shuffles"],
                       torch.tensor([0.0, 1.0]))
    other = _save(tmp_path / "other.pt", {"w": torch.tensor([3.0, 6.0]),
                                          "decoder.rnn.weights": torch.tensor([0.0, 1.0])})
    assert avg.main(["--inputs", other, old, "--output", str(out)]) == 1


def test_last_n_by_number(tmp_path):
    for name in ("checkpoint2.pt", "checkpoint9.pt", "checkpoint10.pt", "checkpoint_best.pt",
                 "checkpoint_last.pt", "checkpoint_3_95.pt", "checkpoint_3_100.pt",
                 "checkpoint_2_50.pt"):
        (tmp_path / name).touch()
    names = lambda paths: [os.path.basename(p) for p in paths]  # noqa: E731
    assert names(avg.last_checkpoints(tmp_path, 2, "epoch")) == ["checkpoint9.pt",
                                                                 "checkpoint10.pt"]
    assert names(avg.last_checkpoints(tmp_path, 2, "update")) == ["checkpoint_3_95.pt",
                                                                  "checkpoint_3_100.pt"]
    with pytest.raises(FileNotFoundError, match="has 3"):
        avg.last_checkpoints(tmp_path, 4, "epoch")


def test_directory_selection_through_cli(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    for epoch in (1, 2, 3):
        _save(d / f"checkpoint{epoch}.pt", {"w": torch.full((2,), float(epoch))})
    out = tmp_path / "avg.pt"
    assert avg.main(["--inputs", str(d), "--num-epoch-checkpoints", "2",
                     "--output", str(out)]) == 0
    assert torch.equal(torch.load(out)["model"]["w"], torch.full((2,), 2.5))
    with pytest.raises(SystemExit):  # a directory needs --num-*-checkpoints
        avg.main(["--inputs", str(d), "--output", str(out)])
    with pytest.raises(SystemExit):  # not enough update checkpoints
        avg.main(["--inputs", str(d), "--num-update-checkpoints", "1", "--output", str(out)])


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    a = _save(tmp_path / "a.pt", {"w": torch.zeros(2)})
    evil = _save(tmp_path / "evil.pt", {"w": torch.zeros(2)}, extra=_RunsCommand(marker))
    out = tmp_path / "avg.pt"
    assert avg.main(["--inputs", a, evil, "--output", str(out)]) == 1
    assert "weights_only" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_failed_write_keeps_old_output(tmp_path, monkeypatch):
    a = _save(tmp_path / "a.pt", {"w": torch.zeros(2)})
    out = tmp_path / "avg.pt"
    out.write_bytes(b"previous")

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(avg.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        avg.main(["--inputs", a, "--output", str(out)])
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "avg.pt"]


def test_same_shapes_but_different_structure_are_refused(tmp_path, capsys):
    """--rearrangement and the tying options change what the weights mean but not their
    names or shapes: averaging such checkpoints must fail like a shape mismatch."""
    model = {"w": torch.zeros(2, 3)}

    def save(name, **options):
        state = {"args": None, "cfg": {"model": argparse.Namespace(arch="toy", **options)},
                 "model": model}
        torch.save(state, tmp_path / name)
        return str(tmp_path / name)

    both = save("both.pt", rearrangement="both", share_decoder_input_output_embed=True)
    none = save("none.pt", rearrangement="none", share_decoder_input_output_embed=True)
    untied = save("untied.pt", rearrangement="both", share_decoder_input_output_embed=False)
    same = save("same.pt", rearrangement="both", share_decoder_input_output_embed=True,
                dropout=0.5)  # options that do not change the weights' meaning may differ
    out = tmp_path / "avg.pt"
    assert avg.main(["--inputs", both, none, "--output", str(out)]) == 1
    assert "--rearrangement=none" in capsys.readouterr().err
    assert avg.main(["--inputs", both, untied, "--output", str(out)]) == 1
    assert "--share-decoder-input-output-embed=False" in capsys.readouterr().err
    assert not out.exists()
    assert avg.main(["--inputs", both, same, "--output", str(out)]) == 0


def test_selection_by_number_keeps_the_newest_training_state(tmp_path):
    """fairseq's scripts/average_checkpoints.py lists the last N newest first and keeps the
    first one's other entries: an average of the last epochs continues (--restore-file) from
    the newest epoch, not from the oldest one averaged."""
    d = tmp_path / "ck"
    d.mkdir()
    for epoch in (1, 2, 3):
        _save(d / f"checkpoint{epoch}.pt", {"w": torch.full((2,), float(epoch))},
              extra_state={"epoch": epoch}, optimizer_history=[{"num_updates": 10 * epoch}])
    for e in (1, 2, 3):
        _save(d / f"checkpoint_{e}_{10 * e}.pt", {"w": torch.full((2,), float(e))},
              extra_state={"epoch": e}, optimizer_history=[{"num_updates": 10 * e}])
    for flag in ("--num-epoch-checkpoints", "--num-update-checkpoints"):
        out = tmp_path / "avg.pt"
        assert avg.main(["--inputs", str(d), flag, "2", "--output", str(out)]) == 0
        got = torch.load(out, weights_only=True)
        assert torch.equal(got["model"]["w"], torch.full((2,), 2.5))
        assert got["extra_state"] == {"epoch": 3}
        assert got["optimizer_history"] == [{"num_updates": 30}]
