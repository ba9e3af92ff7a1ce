"""grnn_fairseq.compat: weights_only allow-list for real fairseq checkpoints, numpy 2 shims."""
import argparse
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("fairseq")
import grnn_fairseq  # noqa: E402
from grnn_fairseq import compat  # noqa: E402
from grnn_fairseq.errors import ConfigError  # noqa: E402

PLUGIN_DIR = os.path.dirname(os.path.abspath(grnn_fairseq.__file__))


# ----------------------------------------------------------------- a tiny real fairseq run
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    parent = os.path.dirname(PLUGIN_DIR)  # children import this very grnn_fairseq
    env["PYTHONPATH"] = os.pathsep.join(p for p in (parent, env.get("PYTHONPATH")) if p)
    return env


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


WORDS = "the a cat dog sat on mat ran big small red blue house tree".split()


def _tiny_words(n, seed):
    rng = np.random.RandomState(seed)
    return [" ".join(rng.choice(WORDS, size=rng.randint(3, 8))) for _ in range(n)]


def tiny_mt_run(tmp_path_factory):
    """Data and checkpoints of a 2-update fairseq `lstm` translation run (with --eval-bleu,
    which pickles numpy arrays into extra_state), made once per session."""
    root = tmp_path_factory.getbasetemp() / "grnn_tiny_mt"
    if (root / "ck" / "checkpoint_last.pt").exists():
        return root
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 40, 0), ("valid", 8, 1), ("test", 6, 2)):
        src = _tiny_words(n, seed)
        (data / f"{split}.src-tgt.src").write_text("\n".join(src) + "\n")
        (data / f"{split}.src-tgt.tgt").write_text(
            "\n".join(" ".join(reversed(s.split())) for s in src) + "\n")
    for lang in ("src", "tgt"):
        (data / f"dict.{lang}.txt").write_text("".join(f"{w} 1\n" for w in WORDS))
    _run([sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", PLUGIN_DIR,
          "--dataset-impl", "raw", "--task", "translation", "--arch", "lstm",
          "--encoder-embed-dim", "8", "--decoder-embed-dim", "8", "--encoder-hidden-size", "8",
          "--decoder-hidden-size", "8", "--decoder-out-embed-dim", "8",
          "--optimizer", "adam", "--lr", "0.01", "--max-tokens", "500", "--max-update", "2",
          "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_b": 3}',
          "--save-dir", str(root / "ck"), "--cpu", "--num-workers", "0", "--seed", "1",
          "--no-progress-bar", "--log-format", "simple"], cwd=root)
    return root


@pytest.fixture(scope="session")
def mt_run(tmp_path_factory):
    return tiny_mt_run(tmp_path_factory)


# ----------------------------------------------------------------- allow-list
EXPECTED = {
    "argparse.Namespace",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.Int64DType",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "typing.Any",
    "builtins.dict",
    "builtins.list",
    "builtins.int",
    "collections.defaultdict",
    "fairseq.distributed.utils._TensorPlaceholder",
}


def _name(obj):
    return f"{obj.__module__}.{obj.__qualname__}"


def test_allow_list_is_exact_and_applied_once():
    if not hasattr(torch.serialization, "add_safe_globals"):
        pytest.skip("torch without weights_only allow-list")
    if not hasattr(np, "_core"):
        pytest.skip("numpy 1.x names differ")
    assert {_name(obj) for obj in compat.safe_globals()} == EXPECTED
    assert all(reason.strip() for _, reason in compat.SAFE_GLOBALS)
    compat.apply()
    compat._APPLIED = False  # force a second real pass: must not add duplicates
    compat.apply()
    registered = [g for g in torch.serialization.get_safe_globals() if not isinstance(g, tuple)]
    for obj in compat.safe_globals():
        assert sum(g is obj for g in registered) == 1, _name(obj)


def _broadcast_payload(state):
    """What fairseq's distributed.utils._broadcast_object_slow pickles on a multi-GPU resume."""
    from fairseq.distributed import utils as distributed_utils

    tensors = []
    obj = distributed_utils._split_tensors_from_obj(state, tensors)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue(), tensors


def test_real_checkpoints_load_through_fairseq(mt_run):
    from fairseq import checkpoint_utils
    from omegaconf import DictConfig

    for name in ("checkpoint1.pt", "checkpoint_best.pt", "checkpoint_last.pt"):
        state = checkpoint_utils.load_checkpoint_to_cpu(str(mt_run / "ck" / name))
        assert isinstance(state["cfg"]["model"], argparse.Namespace)
    # the --eval-bleu meters are numpy arrays: the numpy entries are exercised
    valid = dict((m[1], m[3]) for m in state["extra_state"]["metrics"]["valid"])
    assert isinstance(valid["_bleu_counts"]["sum"], np.ndarray)

    # multi-GPU resume: the other ranks torch.load (weights_only) what rank 0 broadcasts
    from fairseq.distributed import utils as distributed_utils

    payload, tensors = _broadcast_payload(state)
    obj = torch.load(io.BytesIO(payload), map_location="cpu")
    got = distributed_utils._put_tensors_in_obj(obj, tensors)
    assert isinstance(got["cfg"], DictConfig)
    assert got["model"].keys() == state["model"].keys()


def test_every_entry_is_needed(mt_run):
    """Drop any one entry and a real checkpoint or broadcast payload no longer loads."""
    from fairseq import checkpoint_utils

    ck = mt_run / "ck" / "checkpoint_last.pt"
    payload, _ = _broadcast_payload(checkpoint_utils.load_checkpoint_to_cpu(str(ck)))
    before = torch.serialization.get_safe_globals()
    full = compat.safe_globals()

    def loads(allowed):
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(allowed)
        try:
            torch.load(ck, map_location="cpu")
            torch.load(io.BytesIO(payload), map_location="cpu")
        except pickle.UnpicklingError:
            return False
        return True

    try:
        assert loads(full)
        for i, obj in enumerate(full):
            assert not loads(full[:i] + full[i + 1:]), f"{_name(obj)} is not needed"
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


WITHOUT_PLUGIN = r"""
import json, sys, argparse, torch, numpy as np
from fairseq import checkpoint_utils
out = {"plugin_imported": "grnn_fairseq" in sys.modules}
try:
    checkpoint_utils.load_checkpoint_to_cpu(sys.argv[1]); out["load"] = "ok"
except Exception as e:
    out["load"] = str(e)
with torch.serialization.safe_globals([argparse.Namespace]):
    try:
        checkpoint_utils.load_checkpoint_to_cpu(sys.argv[1]); out["load_ns"] = "ok"
    except Exception as e:
        out["load_ns"] = str(e)
from fairseq.data import TokenBlockDataset
try:
    TokenBlockDataset([torch.tensor([4, 5, 2])], np.array([3]), block_size=8, pad=1, eos=2,
                      break_mode="eos"); out["eos"] = "ok"
except Exception as e:
    out["eos"] = repr(e)
from fairseq.data import data_utils
from fairseq.data.data_utils import get_buckets
try:
    get_buckets(np.array([1, 2, 3, 4]), 2); out["buckets"] = "ok"
except Exception as e:
    out["buckets"] = repr(e)
out["batches"] = [len(b) for b in data_utils.batch_by_size(
    np.arange(11), lambda i: 1, max_sentences=8, required_batch_size_multiple=8)]
print("RESULT " + json.dumps(out))
"""


def test_without_plugin_it_fails(mt_run):
    """Control: the same checkpoint and datasets fail on this stack without the plugin."""
    out = _run([sys.executable, "-c", WITHOUT_PLUGIN, str(mt_run / "ck" / "checkpoint_last.pt")],
               cwd=mt_run)
    res = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert res["plugin_imported"] is False
    if "weights_only" not in torch.load.__doc__:
        pytest.skip("old torch")
    assert "argparse.Namespace" in res["load"]
    assert "numpy" in res["load_ns"]  # the --eval-bleu arrays need the numpy entries
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        assert "compat" in res["eos"]
    if not compat._percentile_accepts_interpolation():  # numpy >= 2.4
        assert "interpolation" in res["buckets"]
    assert res["batches"] == [8]  # fairseq drops the last 3 of 11 (fairseq#5036)


def test_resume_with_batch_buckets(mt_run, tmp_path):
    """fairseq-train resumes from the checkpoint (with --num-batch-buckets, which needs the
    np.compat.long and get_buckets fixes)."""
    ck = tmp_path / "ck"
    shutil.copytree(mt_run / "ck", ck)
    out = _run([sys.executable, "-m", "fairseq_cli.train", str(mt_run / "data"),
                "--user-dir", PLUGIN_DIR, "--dataset-impl", "raw", "--task", "translation",
                "--arch", "lstm", "--encoder-embed-dim", "8", "--decoder-embed-dim", "8",
                "--encoder-hidden-size", "8", "--decoder-hidden-size", "8",
                "--decoder-out-embed-dim", "8", "--optimizer", "adam", "--lr", "0.01",
                "--max-tokens", "500", "--max-update", "3", "--num-batch-buckets", "2",
                "--save-dir", str(ck), "--cpu", "--num-workers", "0", "--no-save",
                "--disable-validation", "--no-progress-bar", "--log-format", "simple"],
               cwd=tmp_path)
    assert "Loaded checkpoint" in out and "@ 2 updates" in out
    assert "num_updates 3" in out


# ----------------------------------------------------------------- unsafe pickles
class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_a_command_is_refused(tmp_path):
    from fairseq import checkpoint_utils

    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    top = tmp_path / "top.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": None, "x": _RunsCommand(marker)}, top)
    # hidden inside an allow-listed class: Namespace must not smuggle it in
    nested = tmp_path / "nested.pt"
    torch.save({"model": {}, "args": argparse.Namespace(evil=_RunsCommand(marker))}, nested)
    for path in (top, nested):
        with pytest.raises(pickle.UnpicklingError, match="system"):
            checkpoint_utils.load_checkpoint_to_cpu(str(path))
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)
    assert not marker.exists()
    # control: the payload is real, an unsafe load does run the command
    torch.load(top, weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------- numpy 2
def test_numpy_compat_long_and_eos_blocks():
    from fairseq.data import TokenBlockDataset

    assert np.compat.long is int
    compat.apply()
    assert np.compat.long is int
    seqs = [torch.tensor([4, 5, 2]), torch.tensor([6, 2]), torch.tensor([7, 8, 9, 2])]
    ds = TokenBlockDataset(seqs, np.array([3, 2, 4]), block_size=8, pad=1, eos=2,
                           break_mode="eos")
    assert [ds[i].tolist() for i in range(len(ds))] == [s.tolist() for s in seqs]


def test_get_buckets_and_language_pair_buckets():
    from fairseq.data import Dictionary, LanguagePairDataset, data_utils
    from fairseq.data.bucket_pad_length_dataset import get_buckets as imported_name

    sizes = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    expected = np.unique(np.percentile(sizes, np.linspace(0, 100, 4), method="lower")[1:])
    assert data_utils.get_buckets(sizes, 3).tolist() == expected.tolist() == [4, 7, 10]
    assert imported_name(sizes, 3).tolist() == [4, 7, 10]

    d = Dictionary()
    for w in "abcdef":
        d.add_symbol(w)
    src = [torch.tensor([d.index(c) for c in s] + [d.eos()]) for s in ("ab", "abcde", "a", "abcd")]
    ds = LanguagePairDataset(src, np.array([len(s) for s in src]), d, src,
                             np.array([len(s) for s in src]), d, num_buckets=2)
    sizes = ds.num_tokens_vec(np.arange(len(ds)))
    assert sizes.dtype == np.int64 and len(sizes) == 4
    batch = ds.collater([ds[i] for i in range(len(ds))])
    assert batch["nsentences"] == 4


def test_last_partial_batch_is_kept():
    from fairseq.data import data_utils

    sizes = np.array([3, 9, 4, 4, 7, 2, 8, 5, 5, 6, 1])
    for kwargs in ({"max_sentences": 8}, {"max_tokens": 20}, {"max_tokens": 1000}):
        batches = data_utils.batch_by_size(np.arange(11), lambda i: sizes[i],
                                           required_batch_size_multiple=8, **kwargs)
        assert np.concatenate(batches).tolist() == list(range(11)), kwargs
    assert [b.tolist() for b in data_utils.batch_by_size(
        [4, 2, 0], lambda i: 1, max_sentences=8, required_batch_size_multiple=8)] == [[4, 2, 0]]
    assert data_utils.batch_by_size(np.arange(0), lambda i: 1, max_sentences=8) == []


def test_diverse_beam_search_tracks_each_sentence_by_its_row():
    """DiverseBeamSearch.step on a batch (dataset ids as fairseq's generator passes them,
    sentences leaving mid-search) gives every sentence what the same steps give it alone:
    each sentence's group overlaps follow it when the batch shrinks (fairseq 0.12.3 indexes
    them by dataset id, an IndexError; a mapping to the current positions would hand them
    to the wrong sentences, which several of the random cases below detect)."""
    from fairseq import search
    from fairseq.data import Dictionary

    d = Dictionary()
    for w in "abcdef":
        d.add_symbol(w)
    vocab, beam, steps = len(d), 4, 6
    ids = [903, 12, 4077, 250, 31]
    leave = {2: [1], 4: [3]}  # step -> rows that are finished before it

    def run(rows, row_ids, lprobs, scores, strength):
        s = search.DiverseBeamSearch(d, num_groups=2, diversity_strength=strength,
                                     diversity_discount=0.9)
        out = {r: [] for r in rows}
        alive = list(rows)
        for t in range(steps):
            if len(rows) > 1:
                alive = [r for r in alive if r not in leave.get(t, [])]
            idx = torch.tensor(alive)
            res = s.step(t, lprobs[t, idx], scores[t, idx][:, :, :t] if t else None, None,
                         torch.tensor([row_ids[rows.index(r)] for r in alive]))
            for i, r in enumerate(alive):
                out[r].append(tuple(x[i] for x in res))
        return out

    for seed in range(10):
        for scale in (0.7, 2.0, 4.0):
            for strength in (0.1, 0.8):
                gen = torch.Generator().manual_seed(seed)
                lprobs = torch.randn(steps, len(ids), beam, vocab, generator=gen)
                lprobs = lprobs.mul(scale).log_softmax(-1)
                scores = torch.randn(steps, len(ids), beam, steps, generator=gen)
                together = run(list(range(len(ids))), ids, lprobs, scores, strength)
                for r in range(len(ids)):
                    alone = run([r], [0], lprobs, scores, strength)[r]
                    case = (seed, scale, strength, r)
                    for (s1, i1, b1), (s2, i2, b2) in zip(together[r], alone):
                        assert torch.equal(i1, i2) and torch.equal(b1, b2), case
                        assert torch.allclose(s1, s2), case


def test_no_repeat_ngram_blocks_the_tokens_that_would_repeat_an_ngram():
    """--no-repeat-ngram-size n on the CPU: at every step each hypothesis may not extend its
    last n - 1 tokens to an n-gram it already holds. The generator passes its whole padded
    token buffer ([rows, max_len + 2], columns 0..step filled); fairseq 0.12's Python path
    compared the buffer's last (padding) columns and blocked nothing. Reference: the banned
    tokens enumerated from each hypothesis's own tokens."""
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    pad, vocab, max_len = 1, 7, 12
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for n in (2, 3, 4):
        block = NGramRepeatBlock(n, use_extension=False)
        for step in range(max_len):
            bsz, beam = 2, 3
            tokens = torch.full((bsz * beam, max_len + 2), pad)
            tokens[:, 0] = 2  # the leading end-of-sentence
            tokens[:, 1: step + 1] = torch.randint(4, vocab, (bsz * beam, step), generator=gen)
            lprobs = torch.zeros(bsz * beam, vocab)
            out = block(tokens, lprobs, bsz, beam, step)
            for row in range(bsz * beam):
                seq = tokens[row, : step + 1].tolist()
                last = seq[len(seq) - (n - 1):]
                banned = {seq[i + n - 1] for i in range(len(seq) - n + 1)
                          if seq[i: i + n - 1] == last} if len(seq) >= n else set()
                got = {w for w in range(vocab) if out[row, w] == -math.inf}
                assert got == banned, (n, step, seq)
                checked += bool(banned)
    assert checked > 20  # the random hypotheses do repeat n-grams


def test_gloo_process_group_is_destroyed_at_exit(tmp_path):
    """fairseq never destroys its process group; a gloo rank could then abort at exit after
    a finished training (pytorch/pytorch#190489).  Importing the plugin registers a handler
    that destroys a gloo group first: an exit handler registered before the import runs
    after it and sees no group left."""
    code = (
        "import atexit, torch.distributed as dist\n"
        "atexit.register(lambda: print('group at exit:', dist.is_initialized()))\n"
        "import grnn_fairseq\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', "
        "rank=0, world_size=1)\n"
        "print('group during the run:', dist.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "group during the run: True" in proc.stdout
    assert "group at exit: False" in proc.stdout, proc.stdout


# ----------------------------------------------------------------- --bf16 / --fp16 / --tpu
def _parsed(*args):
    """fairseq-train's configuration for ``args`` (parsed as fairseq-train parses them)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = ["data", "--arch", "rnnsearch", "--task", "translation", "--optimizer", "adam",
            "--lr", "0.001", *args]
    parsed = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    return convert_namespace_to_omegaconf(parsed), argv


def _tpu_flags(cfg):
    flags = {}
    for key in cfg.keys():
        section = cfg[key]
        if hasattr(section, "keys") and "tpu" in section.keys():
            flags[key] = section.tpu
        elif isinstance(section, argparse.Namespace) and hasattr(section, "tpu"):
            flags[key] = section.tpu
    return flags


def test_bf16_without_xla_keeps_the_device_everywhere_in_the_config():
    cfg, argv = _parsed("--bf16", "--cpu")
    before = _tpu_flags(cfg)  # fairseq ties --bf16 to --tpu, in every copied section
    assert before["common"] is True and len(before) >= 4 and all(before.values()), before
    compat.check_precision(cfg, training=True, argv=argv, xla=True)  # a TPU machine: as is
    assert all(_tpu_flags(cfg).values())
    compat.check_precision(cfg, training=True, argv=argv, xla=False)
    after = _tpu_flags(cfg)
    assert after.keys() == before.keys() and not any(after.values()), after
    assert cfg.common.bf16 is True


def test_tpu_without_xla_and_fp16_without_cuda_name_the_fix():
    cfg, argv = _parsed("--bf16", "--tpu")
    with pytest.raises(ConfigError, match="--tpu needs torch_xla"):
        compat.check_precision(cfg, training=True, argv=argv, xla=False)
    cfg, argv = _parsed("--fp16", "--cpu")
    with pytest.raises(ConfigError, match="--fp16 trains on a CUDA GPU only.*--bf16"):
        compat.check_precision(cfg, training=True, argv=argv, xla=False, cuda=True)
    compat.check_precision(cfg, training=False, argv=argv, xla=False)  # generate --fp16: fine
    cfg, argv = _parsed("--fp16")
    with pytest.raises(ConfigError, match="--fp16 trains on a CUDA GPU only"):
        compat.check_precision(cfg, training=True, argv=argv, xla=False, cuda=False)
    compat.check_precision(cfg, training=True, argv=argv, xla=False, cuda=True)  # a GPU: fine


PROBE = """
import json, sys
from fairseq import trainer
from fairseq_cli import train

original = trainer.Trainer.train_step
seen = {}

def train_step(self, samples, *args, **kwargs):
    p = next(self.model.parameters())
    seen.update(dtype=str(p.dtype), device=str(p.device), tpu=bool(self.tpu),
                optimizer=type(self.optimizer).__name__)
    return original(self, samples, *args, **kwargs)

trainer.Trainer.train_step = train_step
sys.argv = ["fairseq-train"] + sys.argv[2:]
try:
    train.cli_main()
finally:
    json.dump(seen, open(OUT, "w"))
"""


def _train_tiny_group_model(mt_run, save, *precision, probe=None):
    args = [str(mt_run / "data"), "--user-dir", PLUGIN_DIR, "--dataset-impl", "raw",
            "--task", "translation", "--arch", "group_rnnsearch_k2",
            "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "8",
            "--decoder-embed-dim", "8", "--encoder-hidden-size", "8",
            "--decoder-hidden-size", "8", "--attention-dim", "8", "--optimizer", "adam",
            "--lr", "0.01", "--max-tokens", "500", "--max-update", "4", "--cpu",
            "--num-workers", "0", "--seed", "1", "--no-progress-bar", "--log-format", "simple",
            "--log-interval", "1", "--save-dir", str(save), "--no-epoch-checkpoints", *precision]
    if probe is None:
        cmd = [sys.executable, "-m", "fairseq_cli.train", *args]
    else:
        cmd = [sys.executable, "-c", f"OUT = {str(probe)!r}\n" + PROBE, "-", *args]
    proc = subprocess.run(cmd, cwd=save.parent, env=_env(), capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _train_loss(log):
    return float(re.findall(r"\btrain(?: \| |:)epoch \d+ \| loss ([\d.]+)", log)[-1])


def test_fairseq_train_bf16_trains_in_bfloat16_on_the_cpu(mt_run, tmp_path):
    """fairseq 0.12's --bf16 stops in the trainer without torch_xla; with the plugin the
    model trains in bfloat16 on the CPU (as on a GPU), its loss close to fp32's, and the
    checkpoint serves fairseq-generate."""
    probe = tmp_path / "probe.json"
    rc, log = _train_tiny_group_model(mt_run, tmp_path / "bf16", "--bf16", probe=probe)
    assert rc == 0, log[-3000:]
    assert json.loads(probe.read_text()) == {"dtype": "torch.bfloat16", "device": "cpu",
                                             "tpu": False, "optimizer": "FP16Optimizer"}
    assert "bfloat16 on the CPU" in log
    rc, log32 = _train_tiny_group_model(mt_run, tmp_path / "fp32")
    assert rc == 0, log32[-3000:]
    bf16, fp32 = _train_loss(log), _train_loss(log32)
    assert abs(bf16 - fp32) < 0.05 * fp32, (bf16, fp32)
    # fairseq saves the model's weights as fp32: the bf16 run's are bf16 values, fp32's not
    for run, bf16_values in (("bf16", True), ("fp32", False)):
        weights = torch.load(tmp_path / run / "checkpoint_last.pt")["model"]
        exact = all(torch.equal(w, w.bfloat16().float()) for w in weights.values()
                    if w.is_floating_point())
        assert exact is bf16_values, run
    out = _run([sys.executable, "-m", "fairseq_cli.generate", str(mt_run / "data"),
                "--user-dir", PLUGIN_DIR, "--dataset-impl", "raw", "--task", "translation",
                "--path", str(tmp_path / "bf16" / "checkpoint_last.pt"), "--gen-subset", "test",
                "--beam", "2", "--max-len-b", "5", "--batch-size", "4", "--cpu",
                "--required-batch-size-multiple", "1"], cwd=tmp_path)
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 6


def test_fairseq_train_fp16_on_the_cpu_stops_with_the_fix(mt_run, tmp_path):
    rc, log = _train_tiny_group_model(mt_run, tmp_path / "fp16", "--fp16")
    assert rc == 1
    assert "error: --fp16 trains on a CUDA GPU only" in log and "Traceback" not in log, log[-2000:]
    rc, log = _train_tiny_group_model(mt_run, tmp_path / "tpu", "--tpu")
    assert rc == 1 and "error: --tpu needs torch_xla" in log and "Traceback" not in log, log[-2000:]


def test_gloo_group_and_ddp_released_at_exit(tmp_path):
    """The exit handler (fairseq never destroys its process group; gloo ranks could abort at
    exit): the DDP wrapper that fairseq makes through compat lets go of the group (reducer,
    logger, process_group) and the gloo group is destroyed.  In a fresh process, world
    size 1, after a real forward and backward through the wrapper."""
    script = """
import torch, torch.distributed as dist
import grnn_fairseq
from grnn_fairseq import compat
from fairseq.models import distributed_fairseq_model as dfm
store = dist.FileStore(%r, 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
wrapped = dfm.DistributedDataParallel(torch.nn.Linear(3, 2), device_ids=[0])
wrapped(torch.randn(4, 3)).sum().backward()
assert wrapped in compat._DDP_MODULES and wrapped.reducer is not None
compat._destroy_gloo_group()
assert not dist.is_initialized()
assert wrapped.reducer is None and wrapped.logger is None and wrapped.process_group is None
compat._destroy_gloo_group()   # again (atexit after a manual call): nothing to do
print("released")
""" % str(tmp_path / "store")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "released" in proc.stdout, proc.stderr[-3000:]
