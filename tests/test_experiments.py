"""Experiment configs, scripts/run_experiment.py and scripts/report.py.

One real end-to-end run (tiny model, one epoch on part of the shipped Debian sample)
checks the row that run_experiment.py appends; everything else is config expansion,
--dry-run output and report generation on made-up rows.
"""
import csv
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
HAVE_FAIRSEQ = importlib.util.find_spec("fairseq") is not None
HAVE_SPM = importlib.util.find_spec("sentencepiece") is not None
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


rx = _load("run_experiment_under_test", SCRIPTS / "run_experiment.py")
report = _load("report_under_test", SCRIPTS / "report.py")

RATES = [1, 0.95, 0.9, 0.7, 0.5, 0.3, 0.1, 0]


def runs_of(name):
    return rx.expand_runs(rx.load_config(ROOT / "configs" / f"{name}.yaml"))


# ------------------------------------------------------------------------------ configs


def test_every_family_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert {"iwslt14_group_rnnsearch", "wmt14_group_rnnsearch", "gigaword_group_rnnsearch",
            "ptb_group_lstm_lm", "restricted_rnn_lm", "debian_deen", "debian_summ",
            "debian_lm", "quickstart"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_every_run_has_its_commands(path, tmp_path):
    cfg = rx.load_config(path)
    assert cfg["data"].get("prepare"), "every config names the command that prepares its data"
    specs = rx.expand_runs(cfg)
    assert specs
    for name, spec in specs.items():
        run = rx.Run(cfg["experiment"], name, spec, tmp_path, None)
        cmds = dict((label, cmd) for label, cmd, _ in run.commands())
        train = cmds["train"]
        assert train[train.index("--arch") + 1] == run.arch
        assert "--user-dir" in train and "--save-dir" in train
        assert str(tmp_path / cfg["experiment"] / name / "seed1") in " ".join(train) or \
            rx.rel(run.save_dir) in train
        assert "--required-batch-size-multiple" in cmds["evaluate"]
        tool = Path(cmds["evaluate"][0]).name
        assert tool == ("fairseq-eval-lm" if cfg["task"] == "lm" else "fairseq-generate")
        if cfg["task"] == "summarization":
            assert cmds["evaluate"][cmds["evaluate"].index("--scoring") + 1] == "rouge"
        if cfg["task"] == "translation":
            assert cmds["evaluate"][cmds["evaluate"].index("--scoring") + 1] == "sacrebleu"
            # tokenized BLEU with fairseq-score where the config asks for it
            assert ("score" in cmds) == ("tokenized_bleu" in cfg["metrics"])
    if cfg["experiment"] != "quickstart" and cfg["task"] == "translation":
        assert "tokenized_bleu" in cfg["metrics"]


@pytest.mark.skipif(not HAVE_FAIRSEQ, reason="needs fairseq")
def test_every_command_parses_with_fairseqs_own_parsers(tmp_path):
    """A misspelled option in a config fails here, not hours into a run (the runner's own
    pre-flight check, run_experiment.check_commands, on every shipped config)."""
    import grnn_fairseq  # noqa: F401

    for path in CONFIGS:
        cfg = rx.load_config(path)
        runs, seen = [], set()
        for name, spec in rx.expand_runs(cfg).items():
            run = rx.Run(cfg["experiment"], name, spec, tmp_path, None)
            key = (run.arch, tuple(sorted(run.train_opts)))
            if key not in seen:
                seen.add(key)
                runs.append(run)
        try:
            rx.check_commands(runs)
        except rx.ConfigError as err:
            pytest.fail(f"{path.name}: {err}")


def test_group_families_cover_the_papers_runs():
    archs = lambda name: {s["train"]["arch"] for s in runs_of(name).values()}  # noqa: E731
    assert archs("iwslt14_group_rnnsearch") == {"rnnsearch"} | {f"group_rnnsearch_k{k}" for k in (2, 4, 8, 16)}
    assert archs("wmt14_group_rnnsearch") == {"rnnsearch_wmt_en_de", "group_rnnsearch_wmt_en_de_k2",
                                              "group_rnnsearch_wmt_en_de_k4"}
    assert archs("gigaword_group_rnnsearch") == {"rnnsearch_gigaword"} | {
        f"group_rnnsearch_gigaword_k{k}" for k in (2, 4, 8, 16)}
    ptb = runs_of("ptb_group_lstm_lm")
    assert {s["train"]["arch"] for s in ptb.values()} == {"group_lstm_lm_k1", "group_lstm_lm_k2",
                                                          "group_lstm_lm_k4"}
    for k in (2, 4):
        assert ptb[f"k{k}_no_rearrangement"]["train"]["rearrangement"] == "none"
        assert "rearrangement" not in ptb[f"k{k}"]["train"]  # the architecture's default: both
    deen = runs_of("debian_deen")
    assert deen["restricted_r0.5"]["train"]["arch"] == "restricted_rnnsearch"
    assert len(runs_of("debian_summ")) == 5
    lm = runs_of("debian_lm")
    assert len([n for n in lm if n.startswith("restricted_")]) == 3 * 8


@pytest.mark.skipif(not HAVE_FAIRSEQ, reason="needs fairseq")
def test_ptb_schedule_decays_after_epoch_14_as_zaremba():
    """Zaremba et al. 2014 (large), as the config's comment says: the learning rate stays
    for 14 epochs, then falls by 1/1.15 after every epoch.  fairseq's fixed schedule
    anneals from epoch --force-anneal on, so that is 15."""
    from fairseq.optim.lr_scheduler.fixed_schedule import FixedLRSchedule, FixedLRScheduleConfig

    for spec in runs_of("ptb_group_lstm_lm").values():
        train = spec["train"]
        assert train["lr-scheduler"] == "fixed"
        sched = FixedLRSchedule(FixedLRScheduleConfig(
            force_anneal=int(train["force-anneal"]), lr_shrink=float(train["lr-shrink"]),
            lr=[float(train["lr"])]), None)
        assert [sched.get_next_lr(e) for e in range(1, 15)] == [20.0] * 14
        for e in (15, 16, 30):  # lr-shrink 0.87 for 1/1.15 = 0.8696
            assert sched.get_next_lr(e) == pytest.approx(20 / 1.15 ** (e - 14), rel=0.01)


def test_wmt_config_prepares_the_dictionary_the_parameter_table_assumes():
    """The WMT sizes land within 5% of Gao et al.'s counts with a joined 40k dictionary
    (paper_tables, README "Parameter counts"); the config's prepare command must build
    that dictionary, not prepare-wmt14-en-de.sh's default (32k: 105M / 73M, -5% / -6%)."""
    import shlex

    from grnn_fairseq.paper_tables import GROUP_RNN

    dataprep = _load("dataprep_under_test", SCRIPTS / "dataprep.py")
    argv = shlex.split(rx.load_config(ROOT / "configs" / "wmt14_group_rnnsearch.yaml")["data"]["prepare"])
    assert argv[:2] == ["bash", "scripts/prepare-wmt14-en-de.sh"]
    opts = dataprep.build_parser("wmt14-en-de").parse_args(argv[2:])
    assert (opts.vocab_size, opts.vocab_size) == GROUP_RNN["wmt_en_de"]["vocab"]


def test_restricted_grid_expands_to_cells_rates_and_embeddings():
    specs = runs_of("restricted_rnn_lm")
    assert len(specs) == 2 * 3 * 8 * 2
    for data, path in (("ptb", "data-bin/ptb"), ("wt2", "data-bin/wikitext-2")):
        mine = {n: s for n, s in specs.items() if n.startswith(data + "_")}
        assert len(mine) == 3 * 8 * 2
        assert {s["data"]["path"] for s in mine.values()} == {path}
        for cell in ("rnn", "gru", "lstm"):
            for r in RATES:
                for emb in ("untied", "tied"):
                    s = mine[f"{data}_{cell}_r{r}_{emb}"]
                    t = s["train"]
                    assert t["arch"] == f"restricted_{cell}_lm"
                    assert t["sharing-rate"] == r
                    if emb == "tied":
                        assert t["share-decoder-input-output-embed"] is True and t["dropout"] == 0.2
                    else:
                        assert not t.get("share-decoder-input-output-embed") and t["dropout"] == 0.0
    run = rx.Run("restricted_rnn_lm", "wt2_gru_r0.3_tied", specs["wt2_gru_r0.3_tied"], "/tmp/w", 3)
    cmd = run.train_cmd()
    assert cmd[cmd.index("--sharing-rate") + 1] == "0.3"
    assert "--share-decoder-input-output-embed" in cmd
    assert cmd[cmd.index("--seed") + 1] == "3" and cmd[1] == "data-bin/wikitext-2"


def test_grid_forms_and_overrides():
    cfg = {"experiment": "x", "task": "lm", "data": {"path": "d", "prepare": "p"},
           "train": {"lr": 1.0, "task": "language_modeling"},
           "runs": {"base": {"arch": "a0"}},
           "grid": {"size": {"small": {"arch": "a1"}, "big": {"arch": "a2", "train": {"lr": 2.0}}},
                    "r": {"values": [0, 0.5], "set": ["train.sharing-rate"], "label": "r{}"}}}
    specs = rx.expand_runs(cfg)
    assert list(specs) == ["base", "small_r0", "small_r0.5", "big_r0", "big_r0.5"]
    assert specs["big_r0.5"]["train"] == {"lr": 2.0, "task": "language_modeling", "arch": "a2",
                                          "sharing-rate": 0.5}
    assert specs["base"]["train"]["lr"] == 1.0
    for key, value in rx.parse_override("train.lr=0.25 train.cpu=true data.path=/x/y"):
        rx.set_dotted(specs["base"], key, value)
    assert specs["base"]["train"]["lr"] == 0.25 and specs["base"]["train"]["cpu"] is True
    assert specs["base"]["data"]["path"] == "/x/y"
    assert rx.options({"a": 1, "b": True, "c": False, "d": None, "e": [1, 2]}) == \
        ["--a", "1", "--b", "--e", "1", "2"]
    cfg["runs"]["small_r0"] = {"arch": "dup"}
    with pytest.raises(rx.ConfigError, match="twice"):
        rx.expand_runs(cfg)


# ------------------------------------------------------------------------------- dry run


def test_dry_run_prints_the_commands(capsys, tmp_path):
    rc = rx.main([str(ROOT / "configs" / "iwslt14_group_rnnsearch.yaml"), "--dry-run",
                  "--only", "k2", "k1?", "--seed", "7", "--work-dir", str(tmp_path),
                  "--override", "train.max-epoch=3"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    train = [line for line in lines if "fairseq-train" in line]
    assert len(train) == 2  # k2 and k16
    assert "--arch group_rnnsearch_k2" in train[0] and "--arch group_rnnsearch_k16" in train[1]
    assert all("--max-epoch 3" in t and "--seed 7" in t and "--keep-last-epochs 5" in t for t in train)
    assert "seed7" in train[0]
    # average: 5, but max-epoch 3 leaves 3 epoch checkpoints, and the runner averages those
    assert sum("grnn_fairseq.average_checkpoints" in line and "--num-epoch-checkpoints 3" in line
               for line in lines) == 2
    gen = [line for line in lines if "fairseq-generate" in line]
    assert len(gen) == 2 and all("--scoring sacrebleu" in g and "--beam 5" in g
                                 and "--post-process sentencepiece" in g for g in gen)
    assert sum("fairseq-score" in line for line in lines) == 2


def test_paths_stay_relative_through_a_symlink_in_the_root(monkeypatch, tmp_path):
    """A data-bin linked into a worktree is recorded as the config names it, relative to
    the root, not as the link's target elsewhere."""
    root, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    (elsewhere / "debian").mkdir(parents=True)
    root.mkdir()
    (root / "data-bin").symlink_to(elsewhere)
    monkeypatch.setattr(rx, "ROOT", root.resolve())
    assert rx.rel(root / "data-bin" / "debian") == "data-bin/debian"
    assert rx.rel(root / "work" / "x") == "work/x"
    assert rx.rel(elsewhere / "debian") == str((elsewhere / "debian").resolve())


def test_unknown_run_is_an_error(capsys):
    rc = rx.main([str(ROOT / "configs" / "quickstart.yaml"), "--dry-run", "--only", "nope"])
    assert rc == 2
    assert "no run matches nope" in capsys.readouterr().err


def test_config_that_is_not_yaml_or_a_folder_is_an_error(capsys, tmp_path):
    """A YAML syntax error used to end in yaml's traceback (exit 1)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\ntask: translation\n  data: [\n")
    assert rx.main([str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 3, column 7: not valid YAML (mapping values are not allowed here)" in err
    assert rx.main([str(ROOT / "configs"), "--dry-run"]) == 2
    assert "configs is a folder: give a config file in it" in capsys.readouterr().err


def test_missing_data_names_the_prepare_script(capsys, tmp_path):
    rc = rx.main([str(ROOT / "configs" / "ptb_group_lstm_lm.yaml"), "--only", "k2",
                  "--work-dir", str(tmp_path), "--results", str(tmp_path / "r.tsv"),
                  "--override", f"data.path={tmp_path / 'no-such-data'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no-such-data" in err and "does not exist" in err
    assert "bash scripts/prepare-ptb.sh" in err
    assert not (tmp_path / "r.tsv").exists() and not (tmp_path / "ptb_group_lstm_lm").exists()


# ------------------------------------------------------------------------- a real run


def binarize_sample_subset(tmp_path, corpus, src, tgt):
    """The first 300 / 16 / 12 pairs of the shipped sample, sentencepiece + fairseq-preprocess
    into tmp_path/bin/data-bin (spm.model inside)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    sample = ROOT / "data" / "debian-sample" / corpus
    for split, n in (("train", 300), ("valid", 16), ("test", 12)):
        for side in (src, tgt):
            lines = (sample / f"{split}.{side}").read_text(encoding="utf-8").splitlines()[:n]
            (raw / f"{split}.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    subprocess.run([sys.executable, str(SCRIPTS / "spm_binarize.py"), str(raw), str(tmp_path / "bin"),
                    "--src", src, "--tgt", tgt, "--vocab-size", "400"], check=True,
                   capture_output=True, env=_env())


@pytest.mark.slow
@pytest.mark.skipif(not (HAVE_FAIRSEQ and HAVE_SPM), reason="needs fairseq and sentencepiece")
def test_tiny_run_appends_a_well_formed_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRNN_CPU_FUSED", "1")  # the default; the row must record it
    binarize_sample_subset(tmp_path, "deen", "de", "en")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
experiment: tiny
task: translation
data: {{path: {tmp_path / 'bin' / 'data-bin'}, prepare: python scripts/spm_binarize.py ...}}
env: {{OMP_NUM_THREADS: 1}}
train:
  arch: group_rnnsearch_k2
  encoder-layers: 1
  decoder-layers: 1
  encoder-embed-dim: 16
  decoder-embed-dim: 16
  encoder-hidden-size: 16
  decoder-hidden-size: 16
  attention-dim: 16
  task: translation
  source-lang: de
  target-lang: en
  optimizer: adam
  lr: 0.005
  max-tokens: 2000
  max-epoch: 1
  cpu: true
  num-workers: 0
average: 2
generate: {{beam: 2, batch-size: 8, post-process: sentencepiece, max-len-b: 10}}
metrics: [sacrebleu, tokenized_bleu]
tokenized_bleu: {{tokenizer: 13a}}
interactive:
  inputs: [Bibliothek für XML]
  options: {{bpe: sentencepiece, sentencepiece-model: {tmp_path / 'bin' / 'data-bin' / 'spm.model'}, max-len-b: 10}}
runs:
  k2: {{}}
""", encoding="utf-8")
    results = tmp_path / "results.tsv"
    rc = rx.main([str(config), "--work-dir", str(tmp_path / "work"), "--results", str(results),
                  "--seed", "3", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Bibliothek für XML" in out and "->" in out  # the interactive translation
    with open(results, encoding="utf-8", newline="") as f:
        assert f.readline().rstrip("\n").split("\t") == list(rx.COLUMNS)
    with open(results, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == 1
    row = rows[0]
    assert (row["experiment"], row["run"], row["task"], row["seed"]) == ("tiny", "k2", "translation", "3")
    assert row["arch"] == "group_rnnsearch_k2" and row["groups"] == "2" and row["cell"] == "lstm"
    assert 0 <= float(row["bleu"]) <= 100 and 0 <= float(row["bleu_tok"]) <= 100
    assert row["epochs"] == "1" and int(row["updates"]) > 0
    assert float(row["train_wps"]) > 0 and float(row["train_wall_s"]) > 0
    assert float(row["gen_tps"]) > 0
    assert row["device"].startswith("cpu") and row["date"]
    for tool in ("fairseq-train", "average_checkpoints", "fairseq-generate", "fairseq-score",
                 "fairseq-interactive"):
        assert tool in row["commands"]
    # the row's commands write where the runner wrote, as --dry-run prints them
    save = tmp_path / "work" / "tiny" / "k2" / "seed3"
    assert f"> {save / 'generate-test.txt'}" in row["commands"], row["commands"]
    assert "interactive.in > " in row["commands"]
    assert "averaged 1 of 2" in row["notes"]
    assert row["rouge1"] == row["ppl"] == ""
    # ... under the environment they ran with: the config's env (the caller's value wins)
    # and the engine's variables
    export, first, _ = row["commands"].split(" && ", 2)
    assert first.split()[0].endswith("fairseq-train"), first
    assert export.split()[0] == "export", export
    recorded = dict(pair.split("=", 1) for pair in export.split()[1:])
    assert recorded == {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                        **{k: v for k, v in os.environ.items() if k.startswith("GRNN_")}}
    assert recorded["GRNN_CPU_FUSED"] == "1"

    # params: exactly the trainable parameters of the averaged checkpoint's model
    import grnn_fairseq  # noqa: F401
    from fairseq import checkpoint_utils
    from grnn_fairseq.params import count_parameters

    save = tmp_path / "work" / "tiny" / "k2" / "seed3"
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(save / "averaged.pt")], arg_overrides={"data": str(tmp_path / "bin" / "data-bin")})
    assert int(row["params"]) == count_parameters(models[0])["total"]
    assert (save / "train.log").is_file() and (save / "generate-test.txt").is_file()

    # the report reads the real row
    report.write_report([str(results)], tmp_path / "report")
    assert "| k2 |" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def _tiny_lm_data(tmp_path):
    text = (ROOT / "data" / "debian-sample" / "deen" / "train.en").read_text(encoding="utf-8").splitlines()
    for split, lines in (("train", text[:200]), ("valid", text[200:230]), ("test", text[230:260])):
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    subprocess.run([str(Path(sys.executable).parent / "fairseq-preprocess"), "--only-source",
                    "--trainpref", str(tmp_path / "train.txt"), "--validpref", str(tmp_path / "valid.txt"),
                    "--testpref", str(tmp_path / "test.txt"), "--destdir", str(tmp_path / "bin")],
                   check=True, capture_output=True, env=_env())


@pytest.mark.skipif(not HAVE_FAIRSEQ, reason="needs fairseq")
def test_tiny_lm_run_reports_perplexity(tmp_path, capsys):
    _tiny_lm_data(tmp_path)
    config = tmp_path / "lm.yaml"
    config.write_text(f"""
experiment: tinylm
task: lm
data: {{path: {tmp_path / 'bin'}, prepare: bash scripts/prepare-ptb.sh}}
env: {{OMP_NUM_THREADS: 1}}
train: {{task: language_modeling, tokens-per-sample: 20, sample-break-mode: none, batch-size: 16,
        optimizer: sgd, lr: 5, clip-norm: 0.25, max-epoch: 1, criterion: cross_entropy, cpu: true,
        num-workers: 0, decoder-embed-dim: 8, decoder-hidden-size: 8, decoder-layers: 2}}
average: 1
eval_lm: {{gen-subset: test, batch-size: 16}}
grid:
  cell: {{gru: {{arch: restricted_gru_lm}}}}
  r: {{values: [0.5], set: train.sharing-rate, label: "r{{}}"}}
""", encoding="utf-8")
    results = tmp_path / "r.tsv"
    assert rx.main([str(config), "--work-dir", str(tmp_path / "w"), "--results", str(results),
                    "--quiet"]) == 0, capsys.readouterr()
    with open(results, encoding="utf-8", newline="") as f:
        (row,) = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert row["run"] == "gru_r0.5" and row["task"] == "lm" and row["cell"] == "gru"
    assert float(row["sharing_rate"]) == 0.5 and row["tied"] == "no"
    assert float(row["ppl"]) > 1 and abs(2 ** float(row["loss"]) - float(row["ppl"])) < 0.01 * float(row["ppl"])
    assert "fairseq-eval-lm" in row["commands"] and row["bleu"] == ""
    from grnn_fairseq.params import build_architecture, count_parameters

    vocab = len((tmp_path / "bin" / "dict.txt").read_text().splitlines()) + 4  # + bos, pad, eos, unk
    vocab += (-vocab) % 8  # fairseq-preprocess pads the dictionary to a multiple of 8
    model = build_architecture("restricted_gru_lm", vocab=vocab, overrides=[
        "--decoder-embed-dim", "8", "--decoder-hidden-size", "8", "--decoder-layers", "2",
        "--sharing-rate", "0.5"])
    assert int(row["params"]) == count_parameters(model)["total"]


def _run_tiny_lm(tmp_path, capsys, max_update, average):
    """run_experiment.py on a tiny LM config (tokens-per-sample 20, batch 4): the save dir."""
    config = _tiny_lm_config(tmp_path, max_update, average)
    assert rx.main([str(config), "--work-dir", str(tmp_path / "w"), "--results",
                    str(tmp_path / "r.tsv"), "--quiet"]) == 0, capsys.readouterr()
    return tmp_path / "w" / "tinylm" / "lstm" / "seed1"


def _tiny_lm_config(tmp_path, max_update, average):
    _tiny_lm_data(tmp_path)
    config = tmp_path / "lm.yaml"
    config.write_text(f"""
experiment: tinylm
task: lm
data: {{path: {tmp_path / 'bin'}}}
env: {{OMP_NUM_THREADS: 1}}
train: {{task: language_modeling, tokens-per-sample: 20, sample-break-mode: none, batch-size: 4,
        optimizer: sgd, lr: 5, max-update: {max_update}, max-epoch: 5, criterion: cross_entropy,
        cpu: true, num-workers: 0, decoder-embed-dim: 8, decoder-hidden-size: 8,
        decoder-layers: 1}}
average: {average}
eval_lm: {{gen-subset: test, batch-size: 16}}
runs: {{lstm: {{arch: restricted_lstm_lm}}}}
""", encoding="utf-8")
    return config


@pytest.mark.skipif(not HAVE_FAIRSEQ, reason="needs fairseq")
def test_run_stopped_inside_the_first_epoch_is_evaluated(tmp_path, capsys):
    """max-update inside epoch 1 leaves no epoch checkpoint: checkpoint_last.pt is
    evaluated, and the row says so."""
    save = _run_tiny_lm(tmp_path, capsys, max_update=3, average=3)
    results = tmp_path / "r.tsv"
    assert not list(save.glob("checkpoint[0-9]*.pt")) and (save / "checkpoint_last.pt").exists()
    with open(results, encoding="utf-8", newline="") as f:
        (row,) = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert row["updates"] == "3" and float(row["ppl"]) > 1
    assert "evaluated checkpoint_last.pt" in row["notes"]
    assert "checkpoint_last.pt --output" in row["commands"]
    # continued: the new row has the new evaluation, not the first one in the kept log
    assert rx.main([str(tmp_path / "lm.yaml"), "--work-dir", str(tmp_path / "w"), "--results",
                    str(results), "--quiet", "--override", "train.max-update=8"]) == 0, \
        capsys.readouterr()
    with open(results, encoding="utf-8", newline="") as f:
        first, again = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    printed = re.findall(r"Perplexity: ([\d.]+)", (save / "eval-test.log").read_text())
    assert again["updates"] == "8" and len(printed) == 2
    assert float(again["ppl"]) == float(printed[1]) != float(first["ppl"])


def _env():
    import os

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


# -------------------------------------------------------------------------------- report


def _fake_results(path):
    rows = []
    for k, params, wps, bleu in ((1, 6244712, 3000, 30.1), (2, 4344168, 3600, 29.5),
                                 (4, 3393896, 4100, 28.7)):
        rows.append({"experiment": "groups", "run": f"k{k}", "task": "translation",
                     "data": "data-bin/iwslt14.de-en", "arch": "a", "cell": "lstm", "groups": k,
                     "rearrangement": "both", "sharing_rate": 0.0, "tied": "decoder",
                     "params": params, "bleu": bleu, "bleu_tok": bleu + 1, "train_wall_s": 100,
                     "train_wps": wps, "epochs": 3, "updates": 30, "device": "cpu", "seed": 1})
    for cell in ("rnn", "lstm"):
        for r, params, ppl in ((0, 964800, 120.0), (0.5, 542700, 125.0), (1, 120600, 140.0)):
            rows.append({"experiment": "rates", "run": f"ptb_{cell}_r{r}_tied", "task": "lm",
                         "data": "data-bin/ptb", "arch": f"restricted_{cell}_lm", "cell": cell,
                         "groups": 1, "rearrangement": "none", "sharing_rate": r, "tied": "yes",
                         "params": params, "ppl": ppl, "seed": 1})
    rows.append(dict(rows[-1], ppl=150.0, seed=2))  # a second seed of one run: averaged
    for row in rows:
        rx.append_row(path, row)


def test_report_writes_markdown_and_plots(tmp_path, capsys):
    tsv = tmp_path / "results.tsv"
    _fake_results(tsv)
    assert report.main([str(tsv), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## groups" in md and "## rates" in md
    assert "| k4 |" in md and "4,344,168" in md and "29.50" in md
    assert "145.00 ± 7.07" in md  # two seeds: mean and standard deviation
    if HAVE_MPL:
        assert (tmp_path / "out" / "groups_groups.png").stat().st_size > 0
        assert (tmp_path / "out" / "rates_sharing_rate.png").stat().st_size > 0
        assert "![groups_groups](groups_groups.png)" in md


def test_report_without_matplotlib_still_writes_markdown(tmp_path, capsys, monkeypatch):
    tsv = tmp_path / "results.tsv"
    _fake_results(tsv)
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    assert report.main([str(tsv), "--out", str(tmp_path / "out")]) == 0
    assert "pip install matplotlib" in capsys.readouterr().err
    assert "| ptb_rnn_r0.5_tied |" in (tmp_path / "out" / "report.md").read_text()
    assert not list((tmp_path / "out").glob("*.png"))


def test_log_parsers():
    log = "\n".join([
        "2026-01-01 | INFO | train | epoch 001 | loss 9 | wps 1000 | num_updates 10 | train_wall 10 | wall 12",
        "2026-01-01 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8 | wps 5000",
        "2026-01-01 | INFO | train | epoch 002 | loss 8 | wps 3000 | num_updates 20 | train_wall 10 | wall 25",
        "==== resumed",  # a finished run started again: a one-second stub of epoch 2
        "2026-01-01 | INFO | train | epoch 002 | loss 8 | wps 10 | num_updates 20 | train_wall 0 | wall 1",
    ])
    assert rx.parse_train_log(log) == {"epochs": 2, "updates": 20, "wps": 2000.0}
    gen = "S-1\tquelle\nT-1\tref one\nH-1\t-0.5\tpiece s\nD-1\t-0.5\thyp one\nT-0\tref zero\nD-0\t-1\t\n" \
          "2026-11-23 03:01:02 | INFO | fairseq_cli.generate | NOTE: hypothesis and token scores " \
          "are output in base 2\n" \
          "2026-11-23 03:01:02 | INFO | fairseq_cli.generate | Translated 736 sentences (9,874 " \
          "tokens) in 31.4s (23.44 sentences/s, 314.46 tokens/s)\n" \
          "Generate test with beam=5: BLEU = 12.34 40/20/10/5 (BP = 1.0)\n"
    hyps, refs, scores = rx.parse_generate(gen)
    assert (hyps, refs, scores["bleu"]) == (["", "hyp one"], ["ref zero", "ref one"], 12.34)
    assert scores["gen_tps"] == 314.46
    scores = rx.parse_generate("Generate test with beam=5: ROUGE-1 35.12 ROUGE-2 16.40 ROUGE-L 32.90")[2]
    assert (scores["rouge1"], scores["rouge2"], scores["rougeL"]) == (35.12, 16.40, 32.90)
    assert rx.parse_eval_lm("x | Loss (base 2): 6.6439, Perplexity: 100.02") == {"loss": 6.6439, "ppl": 100.02}


def test_parse_generate_nbest_keeps_the_best_hypothesis():
    # fairseq-generate --nbest 2 prints two H-/D- lines per sentence, best first; the
    # score line (and so bleu / rouge*) is of the best one, and so must test.hyp be
    gen = ("S-1\tsrc one\nT-1\tref one\nH-1\t-0.1\tbest one\nD-1\t-0.1\tbest one\n"
           "P-1\t-0.1 -0.1\nH-1\t-0.9\tsecond one\nD-1\t-0.9\tsecond one\nP-1\t-0.9 -0.9\n"
           "S-0\tsrc zero\nT-0\tref zero\nD-0\t-0.2\tbest zero\nD-0\t-0.5\t\n"
           "Generate test with beam=5: ROUGE-1 35.12 ROUGE-2 16.40 ROUGE-L 32.90\n")
    hyps, refs, _ = rx.parse_generate(gen)
    assert (hyps, refs) == (["best zero", "best one"], ["ref zero", "ref one"])


def test_append_row_keeps_one_header(tmp_path):
    tsv = tmp_path / "r.tsv"
    rx.append_row(tsv, {"experiment": "e", "run": "a", "commands": "x\ty\nz"})
    rx.append_row(tsv, {"experiment": "e", "run": "b"})
    lines = tsv.read_text().splitlines()
    assert len(lines) == 3 and lines[0].split("\t") == list(rx.COLUMNS)
    assert all(len(line.split("\t")) == len(rx.COLUMNS) for line in lines)


def test_append_row_to_an_older_file_keeps_every_old_field(tmp_path):
    """A results file written by an older version (a column since retired, one not yet
    there, a quote in a note) is rewritten to the current columns without losing a field;
    a csv round trip raised "need to escape" on the quote, after the run had trained."""
    tsv = tmp_path / "r.tsv"
    old_columns = [c for c in rx.COLUMNS if c != "notes"] + ["retired"]
    old_row = {c: "" for c in old_columns} | {"experiment": "e", "run": "old",
                                               "commands": 'fairseq-train --x "a b"',
                                               "retired": "kept"}
    tsv.write_text("\t".join(old_columns) + "\n"
                   + "\t".join(old_row[c] for c in old_columns) + "\n", encoding="utf-8")
    rx.append_row(tsv, {"experiment": "e", "run": "new", "notes": "n"})
    rx.append_row(tsv, {"experiment": "e", "run": "newer"})
    header, *rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()]
    assert header == list(rx.COLUMNS) + ["retired"]
    got = [dict(zip(header, r)) for r in rows]
    assert [r["run"] for r in got] == ["old", "new", "newer"]
    assert got[0]["commands"] == 'fairseq-train --x "a b"' and got[0]["retired"] == "kept"
    assert got[0]["notes"] == "" and got[1]["notes"] == "n" and got[2]["retired"] == ""



@pytest.mark.slow
@pytest.mark.skipif(not (HAVE_FAIRSEQ and HAVE_SPM), reason="needs fairseq and sentencepiece")
def test_tiny_summarization_run_on_the_real_sample_reports_rouge(tmp_path, capsys):
    """Summarization on the shipped Debian sample (description -> synopsis): a tiny
    group_rnnsearch_k2, one epoch, fairseq-generate --scoring rouge, one row with ROUGE."""
    binarize_sample_subset(tmp_path, "summ", "src", "tgt")
    config = tmp_path / "summ.yaml"
    config.write_text(f"""
experiment: tinysumm
task: summarization
data: {{path: {tmp_path / 'bin' / 'data-bin'}, prepare: python scripts/spm_binarize.py ...}}
env: {{OMP_NUM_THREADS: 1}}
train:
  arch: group_rnnsearch_gigaword_k2
  encoder-layers: 1
  decoder-layers: 1
  encoder-embed-dim: 16
  decoder-embed-dim: 16
  encoder-hidden-size: 16
  decoder-hidden-size: 16
  attention-dim: 16
  task: translation
  source-lang: src
  target-lang: tgt
  optimizer: adam
  lr: 0.005
  max-tokens: 3000
  max-epoch: 1
  cpu: true
  num-workers: 0
average: 1
generate: {{beam: 2, batch-size: 8, post-process: sentencepiece, max-len-b: 12}}
metrics: [rouge]
runs:
  k2: {{}}
""", encoding="utf-8")
    results = tmp_path / "results.tsv"
    rc = rx.main([str(config), "--work-dir", str(tmp_path / "work"), "--results", str(results),
                  "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    with open(results, encoding="utf-8", newline="") as f:
        row = next(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert row["task"] == "summarization" and row["bleu"] == ""
    for key in ("rouge1", "rouge2", "rougeL"):
        assert 0 <= float(row[key]) <= 100
    assert "--scoring rouge" in row["commands"]


def test_group_plot_lines_skip_families_run_at_one_k(tmp_path):
    """A results file with group LSTMs (K = 1, 2; two rearrangements) and restricted
    models at r = 0 (K = 1 only): the groups plot draws the group family only."""
    tsv = tmp_path / "mixed.tsv"
    for run, arch, k, rearr, r in (("k1", "group_lstm_lm_k1", 1, "both", 0.0),
                                   ("k2", "group_lstm_lm_k2", 2, "both", 0.0),
                                   ("k2_none", "group_lstm_lm_k2", 2, "none", 0.0),
                                   ("lstm_r0", "restricted_lstm_lm", 1, "none", 0.0),
                                   ("lstm_r0.5", "restricted_lstm_lm", 1, "none", 0.5)):
        rx.append_row(tsv, {"experiment": "mixed", "run": run, "task": "lm", "arch": arch,
                            "data": "data-bin/debian/lm/data-bin", "groups": k,
                            "rearrangement": rearr, "sharing_rate": r, "params": 1000 * (5 - k),
                            "ppl": 200.0 + k, "seed": 1})
    runs = report.aggregate(report.read_rows([tsv]))["mixed"]
    pts = [s for s in runs if s["groups_k"] is not None and not s["r"]]
    lines = report.group_series(pts)
    assert sorted(lines) == [("lm", "group_lstm_lm", "both"), ("lm", "group_lstm_lm", "none")]
    assert sorted(s["run"] for s in lines[("lm", "group_lstm_lm", "both")]) == ["k1", "k2"]


def test_group_plot_joins_the_baseline_to_its_group_family(tmp_path):
    """``rnnsearch`` (K = 1) is the baseline of ``group_rnnsearch_k<K>``: one line from K = 1;
    fairseq's own model (no groups) and the restricted model stay out of it."""
    tsv = tmp_path / "mt.tsv"
    for run, arch, k, r in (("k1", "rnnsearch", "1", 0.0), ("k2", "group_rnnsearch_k2", "2", 0.0),
                            ("k4", "group_rnnsearch_k4", "4", 0.0),
                            ("restricted", "restricted_rnnsearch", "1", 0.5),
                            ("fairseq_lstm", "lstm_wiseman_iwslt_de_en", "", "")):
        rx.append_row(tsv, {"experiment": "mt", "run": run, "task": "translation", "arch": arch,
                            "data": "data-bin/debian/deen/data-bin", "groups": k,
                            "rearrangement": "both" if k else "", "sharing_rate": r,
                            "params": 1000, "bleu": 20.0, "seed": 1})
    runs = report.aggregate(report.read_rows([tsv]))["mt"]
    pts = [s for s in runs if s["groups_k"] is not None and not s["r"]]
    lines = report.group_series(pts)
    assert list(lines) == [("deen", "group_rnnsearch", "both")]
    assert sorted(s["run"] for s in lines[("deen", "group_rnnsearch", "both")]) == ["k1", "k2", "k4"]


def test_model_fields_groups_and_tied_columns():
    """The structure columns of a results row: groups "K", "K_enc/K_dec", or "" for a model
    without groups (fairseq's own, which wrote "None" before); tied embeddings read the
    encoder-decoder way when the model has an encoder."""
    from argparse import Namespace as N
    fields = rx.model_fields
    ours = fields(N(arch="group_rnnsearch_k4", encoder_embed_dim=128, encoder_groups=4,
                    decoder_groups=4, share_decoder_input_output_embed=True))
    assert (ours["groups"], ours["tied"]) == ("4", "decoder")
    assert fields(N(encoder_embed_dim=8, encoder_groups=2, decoder_groups=4))["groups"] == "2/4"
    theirs = fields({"_name": "lstm_wiseman_iwslt_de_en", "encoder_embed_dim": 256,
                     "share_all_embeddings": True})
    assert (theirs["arch"], theirs["groups"], theirs["tied"]) == (
        "lstm_wiseman_iwslt_de_en", "", "all")
    lm = fields(N(arch="restricted_lstm_lm", decoder_groups=1,
                  share_decoder_input_output_embed=True))
    assert (lm["groups"], lm["tied"]) == ("1", "yes")


# ------------------------------------------------------------------- audit regressions


@pytest.mark.skipif(not HAVE_FAIRSEQ, reason="needs fairseq")
def test_misspelled_evaluation_option_stops_before_training(tmp_path, capsys):
    """A misspelled eval_lm / generate option fails in fairseq's parser before any run
    trains (it used to fail after the first run's training)."""
    config = _tiny_lm_config(tmp_path, max_update=3, average=1)
    rc = rx.main([str(config), "--work-dir", str(tmp_path / "w"), "--results",
                  str(tmp_path / "r.tsv"), "--quiet", "--override", "eval_lm.beem=5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--beem" in err and "nothing was trained" in err, err
    assert not (tmp_path / "w").exists() and not (tmp_path / "r.tsv").exists()


def test_override_with_an_unknown_key_is_an_error(capsys):
    """A misspelled top-level key (trian.lr, averge) was silently ignored."""
    for bad, hint in (("trian.lr=1", "'train'"), ("averge=1", "'average'"), ("experiment=x", "")):
        rc = rx.main([str(ROOT / "configs" / "quickstart.yaml"), "--dry-run", "--override", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "unknown setting" in err and hint in err, (bad, err)


def test_report_keeps_runs_trained_apart_and_takes_the_latest_by_date(tmp_path):
    """Rows of one run name trained on other data / in another work dir are not averaged
    as seeds, and a continued run's latest row wins whatever the order of the files."""
    def row(work, data, seed, ppl, date):
        save = f"{work}/e/r/seed{seed}"
        return {"experiment": "e", "run": "r", "task": "lm", "data": data, "seed": seed,
                "ppl": ppl, "date": date, "commands": f"fairseq-train {data} --save-dir {save}"}
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    for r in (row("work/x", "d1", 1, 100.0, "2026-01-02"), row("work/y", "d2", 1, 200.0, "2026-01-01"),
              row("work/x", "d1", 2, 110.0, "2026-01-01")):
        rx.append_row(a, r)
    rx.append_row(b, row("work/x", "d1", 1, 90.0, "2026-01-03"))  # work/x seed 1, continued
    for files in ([a, b], [b, a]):
        (runs,) = report.aggregate(report.read_rows(files)).values()
        got = {s["run"]: (s["ppl"], s["n"]) for s in runs}
        assert got == {"r (work/x)": (100.0, 2), "r (work/y)": (200.0, 1)}, got


@pytest.mark.skipif(not HAVE_FAIRSEQ, reason="needs fairseq")
def test_run_stopped_inside_a_later_epoch_evaluates_its_final_updates(tmp_path, capsys):
    """max-update inside epoch 2: only checkpoint_last.pt holds the final updates, so it is
    evaluated (it was checkpoint1.pt, while the row said updates = max-update)."""
    save = _run_tiny_lm(tmp_path, capsys, max_update=40, average=1)
    results = tmp_path / "r.tsv"
    assert (save / "checkpoint1.pt").exists() and not (save / "checkpoint2.pt").exists()
    with open(results, encoding="utf-8", newline="") as f:
        (row,) = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert row["epochs"] == "2" and row["updates"] == "40"
    import torch

    state = torch.load(save / "averaged.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 40
    assert "stopped inside epoch 2 at 40 updates" in row["notes"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FAIRSEQ, reason="needs fairseq")
def test_dry_run_script_runs_in_bash_as_the_runner_would(tmp_path, capsys):
    """The --dry-run output, run by bash from another folder, trains, averages and evaluates
    the model the runner evaluates (it had no cd to the repository root, and asked for
    ``average`` epoch checkpoints where max-epoch leaves fewer)."""
    config = _tiny_lm_config(tmp_path, max_update=1000, average=2)
    args = [str(config), "--override", "train.max-epoch=1"]
    assert rx.main(args + ["--dry-run", "--work-dir", str(tmp_path / "script")]) == 0
    script = tmp_path / "dry-run.sh"
    script.write_text(capsys.readouterr().out, encoding="utf-8")
    done = subprocess.run(["bash", "-e", str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    printed = re.findall(r"Perplexity: ([\d.]+)", done.stdout + done.stderr)
    assert len(printed) == 1
    assert (tmp_path / "script" / "tinylm" / "lstm" / "seed1" / "averaged.pt").exists()
    results = tmp_path / "r.tsv"
    assert rx.main(args + ["--work-dir", str(tmp_path / "runner"), "--results", str(results),
                           "--quiet"]) == 0, capsys.readouterr()
    with open(results, encoding="utf-8", newline="") as f:
        (row,) = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert float(row["ppl"]) == float(printed[0]) and "averaged 1 of 2" in row["notes"]


def test_dry_run_script_makes_what_its_commands_read(tmp_path, capsys):
    """Every line of a translation --dry-run --prepare (missing data, tokenized BLEU,
    fairseq-interactive, a config env) is a command that bash can run from the repository
    root, and every file a command reads from the save dir is written by an earlier line
    or, where the runner writes it in Python, named by an earlier # line (interactive.in
    was not written; the cd, the env, the data preparation and fairseq-generate's > were
    missing)."""
    rc = rx.main([str(ROOT / "configs" / "quickstart.yaml"), "--dry-run", "--prepare",
                  "--work-dir", str(ROOT / "work"), "--override",
                  f"metrics=[sacrebleu,tokenized_bleu] data.path={tmp_path / 'data-bin'}"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert commands[0] == f"cd {ROOT}"
    assert f"PYTHON=${{PYTHON-{sys.executable}}} {sys.executable} scripts/spm_binarize.py" \
        in commands[1]  # the data, prepared as the runner prepares it, before any training
    save = "work/quickstart/group_rnnsearch_k2/seed1"
    written, comments, reads = set(), "", 0
    for line in lines:
        if line.startswith("#"):
            comments += line
            continue
        words = shlex.split(line)
        while re.fullmatch(r"[A-Z_]+=.*", words[0]):  # the config's env: OMP_NUM_THREADS=...
            words = words[1:]
        assert words[0] in ("cd", "mkdir", "printf") or shutil.which(words[0]), line
        pairs = list(zip(words, words[1:]))
        for flag, path in pairs:
            if flag in ("<", "--path", "--inputs", "--sys", "--ref") and path.startswith(save):
                reads += 1
                assert path in written or Path(path).name in comments, (path, line)
        written |= {path for flag, path in pairs if flag in (">", "-p", "--save-dir", "--output")}
    assert reads == 6  # --inputs, 2 x --path, --sys, --ref, < interactive.in
    assert any(line.startswith("OMP_NUM_THREADS=") and "fairseq-train" in line for line in lines)
    assert f"{save}/generate-test.txt" in written and f"{save}/interactive.txt" in written


def test_report_names_every_device_its_averaged_seeds_ran_on(tmp_path):
    """Seeds of one run trained on two machines: the device column names both, once each,
    in the order of the seeds' dates (it showed only the latest seed's machine, beside
    speeds averaged over both)."""
    tsv = tmp_path / "r.tsv"
    for seed, device, date in ((2, "cpu: B", "2026-01-02"), (1, "cpu: A", "2026-01-01"),
                               (3, "cpu: B", "2026-01-03")):
        rx.append_row(tsv, {"experiment": "e", "run": "r", "task": "lm", "data": "d",
                            "seed": seed, "ppl": 100.0, "device": device, "date": date,
                            "commands": f"fairseq-train d --save-dir work/e/r/seed{seed}"})
    (runs,) = report.aggregate(report.read_rows([tsv])).values()
    assert [(s["device"], s["n"]) for s in runs] == [("cpu: A / cpu: B", 3)]


def test_report_warns_when_averaged_seeds_trained_unequal_budgets(tmp_path, capsys):
    """Seeds averaged into one row but trained for different numbers of updates (one stopped
    inside an epoch by a time limit) are flagged in the row, under the table and on stderr;
    seeds of equal budgets are not."""
    tsv = tmp_path / "r.tsv"
    for run, seed, epochs, updates, notes in (
            ("short", 1, 10, 1000, ""),
            ("short", 2, 7, 650, "stopped inside epoch 7 at 650 updates: averaged checkpoint_last.pt"),
            ("equal", 1, 10, 1000, ""), ("equal", 2, 10, 1000, "")):
        rx.append_row(tsv, {"experiment": "e", "run": run, "task": "lm", "data": "d", "seed": seed,
                            "ppl": 100.0 + seed, "epochs": epochs, "updates": updates,
                            "notes": notes, "commands": f"fairseq-train d --save-dir "
                                                        f"work/e/{run}/seed{seed}"})
    assert report.main([str(tsv), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| short ⚠ |" in md and "| equal |" in md
    budgets = ("seed 1: 10 epochs, 1000 updates; seed 2: 7 epochs, 650 updates "
               "(stopped inside epoch 7)")
    assert f"⚠ short: the mean over 2 seeds mixes unequal training budgets ({budgets})" in md
    err = capsys.readouterr().err
    assert "warning: e / short:" in err and budgets in err and "e / equal" not in err
