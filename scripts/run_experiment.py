#!/usr/bin/env python
"""Run the experiments of a config file: train, average checkpoints, evaluate, record.

    python scripts/run_experiment.py configs/iwslt14_group_rnnsearch.yaml
    python scripts/run_experiment.py configs/restricted_rnn_lm.yaml --only 'ptb_lstm_*' --dry-run
    python scripts/run_experiment.py configs/quickstart.yaml --override "train.max-epoch=2"

For every run of the config (``runs`` and the expansion of ``grid``, see configs/README.md):

1. ``fairseq-train`` into ``work/<experiment>/<run>/seed<N>/`` (``--work-dir`` moves
   ``work``).  Re-running continues from that folder's ``checkpoint_last.pt``; a finished
   run trains no further.  The output is shown and appended to ``train.log`` there.
2. ``python -m grnn_fairseq.average_checkpoints`` over the last ``average`` epoch
   checkpoints -> ``averaged.pt``.
3. Evaluation with fairseq's tools on the ``test`` split:
   translation   ``fairseq-generate --scoring sacrebleu`` (detokenized, ``bleu``) and
                 ``fairseq-score`` on tokenized hypotheses / references (``bleu_tok``);
   summarization ``fairseq-generate --scoring rouge`` (``rouge1``, ``rouge2``, ``rougeL``);
   lm            ``fairseq-eval-lm`` (``ppl``, ``loss`` in bits).
   Optionally ``fairseq-interactive`` translates the config's ``interactive.inputs``.
4. One row per run is appended to the results TSV (default ``results/<experiment>.tsv``):
   the exact parameter count of the averaged checkpoint's model, the metrics, training
   wall time and target tokens/s (fairseq's ``wps``), device, seed, date and commands
   (with an ``export`` of the config's env and the ``GRNN_*`` variables they ran with).

Relative paths inside a config are relative to the repository root, where every command
runs.  Exit status: 0 when every run succeeded, 2 for a configuration or data problem,
1 when a command failed.
"""
import argparse
import copy
import csv
import datetime
import fnmatch
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER_DIR = ROOT / "grnn_fairseq"
TASKS = ("translation", "summarization", "lm")
COLUMNS = ("experiment", "run", "task", "data", "arch", "cell", "groups", "rearrangement",
           "sharing_rate", "tied", "params", "bleu", "bleu_tok", "rouge1", "rouge2", "rougeL",
           "ppl", "loss", "train_wall_s", "train_wps", "gen_tps", "epochs", "updates", "device",
           "seed",
           "date", "commands", "notes")
# keys of a config that describe the experiment rather than one run
META_KEYS = ("experiment", "description", "paper", "runs", "grid")
# keys of a run's settings (configs/README.md, Format); anything else is a typo
SETTING_KEYS = ("task", "data", "env", "train", "average", "generate", "eval_lm", "metrics",
                "tokenized_bleu", "interactive")
# fairseq-train options the runner sets itself
RESERVED_TRAIN = ("save-dir", "user-dir", "seed")
# lines of fairseq's output shown while it runs (everything goes to the logs; --verbose
# shows everything)
SHOWN = re.compile(r"\| (train_inner|train|valid) \||done training|num\. shared model params|"
                   r"Generate \S+ with beam|BLEU4? = |Loss \(base 2\)|^averaged |Traceback|"
                   r"Error|error:|^BLEU")


class ConfigError(Exception):
    """A problem with the config, the command line or the data: exit status 2."""


class CommandError(Exception):
    """A command failed: exit status 1."""


# ------------------------------------------------------------------------------ config


def deep_merge(base, override):
    """A copy of ``base`` with ``override`` merged in (dicts recursively, the rest replaced)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(spec, dotted, value):
    """``set_dotted(spec, "train.lr", 0.1)`` sets ``spec["train"]["lr"]``."""
    keys = dotted.split(".")
    node = spec
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = copy.deepcopy(value)


def _run_overrides(value, where):
    """A run's (or an axis value's) settings; ``arch: X`` is short for ``train: {arch: X}``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
    value = copy.deepcopy(value)
    if "arch" in value:
        value.setdefault("train", {})["arch"] = value.pop("arch")
    return value


def _axis_values(axis, spec):
    """[(label, overrides)] of one grid axis.

    Two forms: a mapping ``label: {settings}``, or
    ``{values: [...], set: dotted.key (or a list of them), label: "r{}"}``."""
    where = f"grid.{axis}"
    if isinstance(spec, dict) and "values" in spec:
        keys = spec.get("set")
        if not keys:
            raise ConfigError(f"{where}: 'values' needs 'set: <dotted.key>' (e.g. train.sharing-rate)")
        keys = [keys] if isinstance(keys, str) else list(keys)
        fmt = spec.get("label", axis + "{}")
        out = []
        for v in spec["values"]:
            ov = {}
            for k in keys:
                set_dotted(ov, k, v)
            out.append((fmt.format(v), _run_overrides(ov, where)))
        return out
    if isinstance(spec, dict):
        return [(str(label), _run_overrides(v, f"{where}.{label}")) for label, v in spec.items()]
    raise ConfigError(f"{where}: expected a mapping label -> settings, or values/set/label")


def expand_runs(cfg):
    """{run name: merged run settings} of a loaded config: ``runs`` first, then every
    combination of the ``grid`` axes (names joined with ``_`` in axis order)."""
    base = {k: v for k, v in cfg.items() if k not in META_KEYS}
    runs = {}

    def add(name, overrides):
        if name in runs:
            raise ConfigError(f"run {name!r} is defined twice")
        runs[name] = deep_merge(base, overrides)

    for name, value in (cfg.get("runs") or {}).items():
        add(str(name), _run_overrides(value, f"runs.{name}"))
    grid = cfg.get("grid") or {}
    if grid:
        if not isinstance(grid, dict):
            raise ConfigError("grid: expected a mapping axis -> values")
        axes = [_axis_values(axis, spec) for axis, spec in grid.items()]
        for combo in itertools.product(*axes):
            merged = {}
            for _, ov in combo:
                merged = deep_merge(merged, ov)
            add("_".join(label for label, _ in combo), merged)
    if not runs:
        raise ConfigError("the config defines no runs ('runs' or 'grid')")
    return runs


def load_config(path):
    """The config as a dict, validated; ``experiment`` defaults to the file name."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a config file in it (e.g. "
                          f"{path / 'quickstart.yaml'})")
    if not path.is_file():
        raise ConfigError(f"no such config: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}" + (f", line {where.line + 1}, column {where.column + 1}"
                                       if where is not None else "")
                          + f": not valid YAML ({what}); fix the file (configs/README.md, "
                            "Format, shows the layout)") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "a config is a YAML text file") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a config is a mapping")
    cfg.setdefault("experiment", path.stem)
    for key in cfg:
        check_key(str(key), str(path))
    task = cfg.get("task")
    if task not in TASKS:
        raise ConfigError(f"{path}: task must be one of {', '.join(TASKS)} (got {task!r})")
    data = cfg.get("data")
    if not isinstance(data, dict) or "path" not in data:
        raise ConfigError(f"{path}: data.path (the data-bin folder) is required")
    return cfg


def check_key(key, where, known=SETTING_KEYS + META_KEYS):
    """ConfigError for a top-level key that no part of the runner reads (``trian.lr``)."""
    if key not in known:
        import difflib

        close = difflib.get_close_matches(key, known, n=1)
        raise ConfigError(f"{where}: unknown setting {key!r}"
                          + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; known: {', '.join(SETTING_KEYS)}")


def parse_override(text):
    """``"train.lr=0.1 data.path=/x"`` -> [("train.lr", 0.1), ("data.path", "/x")]."""
    import yaml

    out = []
    for item in shlex.split(text):
        if "=" not in item:
            raise ConfigError(f"--override {item!r}: expected dotted.key=value (e.g. train.lr=0.001)")
        key, value = item.split("=", 1)
        # a run's settings only: experiment / runs / grid are read before overrides apply
        check_key(key.strip().split(".")[0], f"--override {item!r}", SETTING_KEYS)
        out.append((key.strip(), yaml.safe_load(value) if value != "" else None))
    return out


# ---------------------------------------------------------------------------- commands


def options(opts):
    """{"max-epoch": 5, "cpu": True, "no-save": False} -> ["--max-epoch", "5", "--cpu"]."""
    args = []
    for key, value in (opts or {}).items():
        if value is None or value is False:
            continue
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag] + [str(v) for v in value]
        else:
            args += [flag, str(value)]
    return args


def tool(name):
    """A fairseq console script: the one next to this Python if there, else from PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.exists():
        return str(sibling) if shutil.which(name) != str(sibling) else name
    return name


def rel(path):
    """``path`` relative to the repository root when inside it (commands run there).  A
    symbolic link inside the root (a data-bin linked into a worktree) stays relative."""
    for candidate in (Path(os.path.abspath(path)), Path(path).resolve()):
        try:
            return str(candidate.relative_to(ROOT))
        except ValueError:
            pass
    return str(Path(path).resolve())


def resolve(path):
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else ROOT / path


def fill(value, places):
    """Replace {data}, {save_dir}, {root} in string option values."""
    if isinstance(value, str):
        for key, repl in places.items():
            value = value.replace("{" + key + "}", repl)
        return value
    if isinstance(value, dict):
        return {k: fill(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, places) for v in value]
    return value


def shell(cmd, stdin=None, stdout=None):
    """``cmd`` as a shell command line, with its stdin / stdout redirections."""
    text = " ".join(shlex.quote(c) for c in cmd)
    text = f"{text} < {shlex.quote(stdin)}" if stdin else text
    return f"{text} > {shlex.quote(stdout)}" if stdout else text


class Run:
    """One run: its settings and the commands that carry it out."""

    def __init__(self, experiment, name, spec, work_dir, seed):
        self.experiment, self.name, self.spec = experiment, name, spec
        self.task = spec["task"]
        self.seed = int(seed if seed is not None else spec.get("train", {}).get("seed", 1))
        self.save_dir = Path(work_dir) / experiment / name / f"seed{self.seed}"
        self.data_dir = resolve(spec["data"]["path"])
        places = {"data": rel(self.data_dir), "save_dir": rel(self.save_dir), "root": str(ROOT)}
        self.train_opts = fill(dict(spec.get("train") or {}), places)
        self.eval_opts = fill(dict(spec.get("generate" if self.task != "lm" else "eval_lm") or {}),
                              places)
        self.interactive = fill(spec.get("interactive") or {}, places)
        self.metrics = list(spec.get("metrics") or {"translation": ["sacrebleu", "tokenized_bleu"],
                                                     "summarization": ["rouge"],
                                                     "lm": ["perplexity"]}[self.task])
        avg = spec.get("average", 1)
        self.average = int(avg.get("checkpoints", 1) if isinstance(avg, dict) else avg or 1)
        self.env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
        for key in RESERVED_TRAIN:
            if key in self.train_opts:
                raise ConfigError(f"{name}: train.{key} is set by the runner (use --seed / --work-dir)")
        if "arch" not in self.train_opts:
            raise ConfigError(f"{name}: no arch (set 'arch' in the run or train.arch)")
        self.arch = self.train_opts["arch"]
        self.subset = str(self.eval_opts.get("gen-subset", "test"))
        self.checkpoint = self.save_dir / "averaged.pt"

    # the commands ----------------------------------------------------------------------
    def train_cmd(self):
        opts = dict(self.train_opts)
        opts.setdefault("log-format", "simple")
        if self.average > 1:
            # keep exactly the epoch checkpoints that are averaged
            opts.setdefault("keep-last-epochs", self.average)
            if opts.get("no-epoch-checkpoints"):
                raise ConfigError(f"{self.name}: average: {self.average} needs epoch checkpoints; "
                                  "drop train.no-epoch-checkpoints")
        return ([tool("fairseq-train"), rel(self.data_dir), "--user-dir", rel(USER_DIR),
                 "--save-dir", rel(self.save_dir), "--seed", str(self.seed)] + options(opts))

    def average_cmd(self, n, paths=None):
        """Average the last ``n`` epoch checkpoints; n = 0: take checkpoint_last.pt alone
        (a run stopped by max-update or stop-time-hours inside its first epoch); ``paths``:
        exactly these checkpoints (a run stopped inside a later epoch: its last epoch
        checkpoints and checkpoint_last.pt, which holds the final updates)."""
        if paths:
            inputs = [rel(p) for p in paths]
        else:
            inputs = ([rel(self.save_dir), "--num-epoch-checkpoints", str(n)] if n
                      else [rel(self.save_dir / "checkpoint_last.pt")])
        return [sys_python(), "-m", "grnn_fairseq.average_checkpoints", "--inputs", *inputs,
                "--output", rel(self.checkpoint)]

    def _common_eval_opts(self):
        opts = dict(self.eval_opts)
        opts.setdefault("gen-subset", self.subset)
        # fairseq otherwise drops the last batch of the test set
        opts.setdefault("required-batch-size-multiple", 1)
        if self.train_opts.get("cpu"):
            opts.setdefault("cpu", True)
        return opts

    def eval_cmd(self):
        opts = self._common_eval_opts()
        if self.task == "lm":
            for key in ("task", "tokens-per-sample", "sample-break-mode"):
                if key in self.train_opts:
                    opts.setdefault(key, self.train_opts[key])
            return ([tool("fairseq-eval-lm"), rel(self.data_dir), "--user-dir", rel(USER_DIR),
                     "--path", rel(self.checkpoint)] + options(opts))
        for key in ("task", "source-lang", "target-lang"):
            if key in self.train_opts:
                opts.setdefault(key, self.train_opts[key])
        scoring = "rouge" if "rouge" in self.metrics else "sacrebleu"
        opts.setdefault("scoring", scoring)
        return ([tool("fairseq-generate"), rel(self.data_dir), "--user-dir", rel(USER_DIR),
                 "--path", rel(self.checkpoint)] + options(opts))

    def score_cmd(self):
        return [tool("fairseq-score"), "--sys", rel(self.save_dir / f"{self.subset}.hyp.tok"),
                "--ref", rel(self.save_dir / f"{self.subset}.ref.tok")]

    def interactive_cmd(self):
        opts = dict(self.interactive.get("options") or {})
        for key in ("task", "source-lang", "target-lang"):
            if key in self.train_opts:
                opts.setdefault(key, self.train_opts[key])
        if self.train_opts.get("cpu"):
            opts.setdefault("cpu", True)
        if "beam" in self.eval_opts:
            opts.setdefault("beam", self.eval_opts["beam"])
        return ([tool("fairseq-interactive"), rel(self.data_dir), "--user-dir", rel(USER_DIR),
                 "--path", rel(self.checkpoint)] + options(opts))

    def interactive_input(self):
        return self.save_dir / "interactive.in"

    def stdout_of(self, label):
        """The file the runner sends a command's stdout to (and parses), or None (its log)."""
        if label == "interactive":
            return self.save_dir / "interactive.txt"
        if label == "evaluate" and self.task != "lm":
            return self.save_dir / f"generate-{self.subset}.txt"
        return None

    def planned_average(self):
        """The epoch checkpoints averaged when training runs to its max-epoch: ``average``,
        or max-epoch when that is fewer (execute() counts what training really left)."""
        max_epoch = int(self.train_opts.get("max-epoch") or 0)
        return min(self.average, max_epoch) if max_epoch else self.average

    def commands(self, n_average=None, average_paths=None):
        """[(label, argv, stdin file or None)] in order; ``n_average`` defaults to
        :meth:`planned_average`."""
        n = self.planned_average() if n_average is None else n_average
        cmds = [("train", self.train_cmd(), None),
                ("average", self.average_cmd(n, average_paths), None),
                ("evaluate", self.eval_cmd(), None)]
        if self.task == "translation" and "tokenized_bleu" in self.metrics:
            cmds.append(("score", self.score_cmd(), None))
        if self.interactive.get("inputs"):
            cmds.append(("interactive", self.interactive_cmd(), rel(self.interactive_input())))
        return cmds

    # data ------------------------------------------------------------------------------
    def prepare_cmd(self):
        """The config's data.prepare command as the runner runs it (its ``python`` is this
        Python); [] when the config names none."""
        argv = shlex.split(self.spec["data"].get("prepare") or "")
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        return argv

    def check_data(self):
        """Raise ConfigError naming the prepare command when the data-bin is not there."""
        d = self.data_dir
        if self.task == "lm":
            needed = ["dict.txt"]
        else:
            src, tgt = self.train_opts.get("source-lang"), self.train_opts.get("target-lang")
            needed = [f"dict.{src}.txt", f"dict.{tgt}.txt"] if src and tgt else []
            if not needed and d.is_dir() and not list(d.glob("dict.*.txt")):
                needed = ["dict.<lang>.txt"]
        missing = [n for n in needed if not (d / n).is_file()]
        if d.is_dir() and not missing and not (list(d.glob(f"{self.subset}.*bin"))
                                               or list(d.glob(f"{self.subset}.*.bin"))):
            missing = [f"{self.subset}*.bin"]
        if not d.is_dir() or missing:
            what = "does not exist" if not d.is_dir() else f"has no {', '.join(missing)}"
            prep = self.spec["data"].get("prepare")
            how = (f"Prepare it first with:\n    {prep}" if prep else
                   "The config names no data.prepare command; point data.path at a fairseq data-bin.")
            raise ConfigError(f"run {self.name}: data folder {rel(d)} {what}.\n{how}\n"
                              "(run it from the repository root; or pass --prepare to let "
                              "run_experiment.py run it)")


def sys_python():
    exe = Path(sys.executable)
    return "python" if shutil.which("python") == str(exe) else str(exe)


# ------------------------------------------------------------------------------- running


def run_logged(cmd, log_path, env, show=True, stdout_path=None, stdin_path=None):
    """Run ``cmd`` in the repository root; stdout+stderr appended to ``log_path`` and shown
    (without fairseq's noise).  With ``stdout_path`` stdout goes there instead (not shown).
    Returns the elapsed seconds; raises CommandError on failure with the log's tail."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shell(cmd, stdin_path)}", flush=True)
    t0 = time.time()
    tail = []
    stdin = open(ROOT / stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:   # line-buffered: tail -f works
        log.write(f"==== {datetime.datetime.now().isoformat(timespec='seconds')} $ {shell(cmd, stdin_path)}\n")
        log.flush()
        out = open(stdout_path, "w", encoding="utf-8") if stdout_path else None
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=stdin,
                                    stdout=out if out else subprocess.PIPE,
                                    stderr=subprocess.PIPE if out else subprocess.STDOUT,
                                    text=True, errors="replace", bufsize=1)
            stream = proc.stderr if out else proc.stdout
            for line in stream:
                log.write(line)
                tail = (tail + [line.rstrip("\n")])[-30:]
                if show == "all" or (show and SHOWN.search(line)):
                    print("  " + line.rstrip("\n"), flush=True)
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        finally:
            if out:
                out.close()
            if stdin_path:
                stdin.close()
    if rc != 0:
        shown = "\n".join("  | " + t for t in tail[-20:])
        raise CommandError(f"command failed (exit {rc}): {shell(cmd, stdin_path)}\n"
                           f"last lines (full log: {rel(log_path)}):\n{shown}")
    return time.time() - t0


_LOG_HEADER = re.compile(r"^==== \S+ \$ ", re.M)  # what run_logged writes before each command


def last_logged(log_path):
    """The output of the last command appended to ``log_path`` by :func:`run_logged` (the
    log keeps every run, so a continued run must not read an earlier evaluation)."""
    text = Path(log_path).read_text(encoding="utf-8", errors="replace")
    starts = [m.start() for m in _LOG_HEADER.finditer(text)]
    return text[starts[-1]:] if starts else text


_SAVED = re.compile(r"Saved checkpoint (.+?) \(epoch (\d+) @ (\d+) updates")


def stopped_inside_epoch(text):
    """(epoch, updates) when the last checkpoint fairseq-train saved (its log ``text``) is
    not an epoch checkpoint: training stopped inside that epoch (max-update,
    stop-time-hours), and only checkpoint_last.pt holds its final updates.  None when the
    last save was an epoch's end (or nothing was saved)."""
    saves = _SAVED.findall(text)
    if not saves:
        return None
    path, epoch, updates = saves[-1]
    if re.fullmatch(r"checkpoint\d+\.pt", Path(path).name):
        return None
    return int(epoch), int(updates)


def epoch_checkpoints(save_dir):
    return sorted(int(m.group(1)) for p in Path(save_dir).glob("checkpoint*.pt")
                  if (m := re.fullmatch(r"checkpoint(\d+)\.pt", p.name)))


_EPOCH_LINE = re.compile(r"\|\s*train\s*\|\s*epoch (\d+)\s*\|(.*)$")


def parse_train_log(text):
    """{epochs, updates, wps} from fairseq-train's end-of-epoch lines.  wps is the mean of
    the epochs' wps weighted by their train_wall, so the stub an epoch gets when a finished
    or time-stopped run is started again (a few tokens, a second) hardly counts."""
    lines = []
    for line in text.splitlines():
        m = _EPOCH_LINE.search(line)
        if m:
            fields = {k: float(v) for k, v in re.findall(r"(\w+) ([-\d.e+]+)", m.group(2))}
            lines.append((int(m.group(1)), fields))
    if not lines:
        return {}
    with_wps = [f for _, f in lines if "wps" in f]
    weights = [f.get("train_wall", 0.0) for f in with_wps]
    if with_wps and sum(weights) > 0:
        wps = sum(f["wps"] * w for f, w in zip(with_wps, weights)) / sum(weights)
    else:
        wps = sum(f["wps"] for f in with_wps) / len(with_wps) if with_wps else None
    return {"epochs": max(e for e, _ in lines),
            "updates": int(lines[-1][1].get("num_updates", 0)), "wps": wps}


def parse_generate(text):
    """Hypotheses / references (by sentence id) and the score line of fairseq-generate."""
    hyps, refs, scores = {}, {}, {}
    for line in text.splitlines():
        if line.startswith("D-"):
            parts = line.split("\t")
            # with --nbest N fairseq prints N D- lines per sentence, best first: the best is
            # the one --scoring scores, so keep the first (not the last, the N-th best)
            hyps.setdefault(int(parts[0][2:]), parts[2] if len(parts) > 2 else "")
        elif line.startswith("T-"):
            parts = line.split("\t")
            refs[int(parts[0][2:])] = parts[1] if len(parts) > 1 else ""
        elif "Generate " in line and "with beam=" in line:
            scores["line"] = line.strip()
            if (m := re.search(r"BLEU4? = ([\d.]+)", line)):
                scores["bleu"] = float(m.group(1))
            for key, label in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
                if (m := re.search(label + r" ([\d.]+)", line)):
                    scores[key] = float(m.group(1))
        elif (m := re.search(r"Translated [\d,]+ sentences \([\d,]+ tokens\) in [\d.]+s "
                             r"\([\d.]+ sentences/s, ([\d.]+) tokens/s\)", line)):
            scores["gen_tps"] = float(m.group(1))   # generated tokens/s, beam search included
    ids = sorted(refs)
    return [hyps.get(i, "") for i in ids], [refs[i] for i in ids], scores


def parse_eval_lm(text):
    m = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+|inf)", text)
    if not m:
        return {}
    return {"loss": float(m.group(1)), "ppl": float(m.group(2))}


def tokenizer(kind, lang):
    """(function str -> str, description) for tokenized BLEU."""
    if kind == "moses":
        try:
            from sacremoses import MosesTokenizer
        except ImportError:
            kind = "13a"
            note = "13a (moses asked; sacremoses is not installed)"
        else:
            tok = MosesTokenizer(lang=lang or "en")
            return (lambda s: tok.tokenize(s, return_str=True, escape=False)), f"moses({lang or 'en'})"
    else:
        note = None
    if kind == "13a":
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        tok13 = Tokenizer13a()
        return (lambda s: tok13(s)), note or "13a"
    if kind in (None, "none", "space"):
        return (lambda s: " ".join(s.split())), "whitespace"
    raise ConfigError(f"tokenized_bleu.tokenizer: one of moses, 13a, none (got {kind!r})")


def model_info(checkpoint, data_dir):
    """Exact parameter count and structure of the model in a checkpoint (built by fairseq
    with the data's dictionaries, as generate / eval-lm build it)."""
    import logging

    logging.getLogger("fairseq").setLevel(logging.WARNING)  # no INFO chatter in our output
    sys.path.insert(0, str(ROOT))
    import grnn_fairseq  # noqa: F401  (registers the models; checkpoints need it)
    from fairseq import checkpoint_utils
    from grnn_fairseq.params import count_parameters

    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data_dir)})
    model, m = models[0], cfg.model
    return {"params": count_parameters(model)["total"], **model_fields(m)}


def model_fields(m):
    """Structure columns of a checkpoint's model config (a namespace or a dict): arch, cell,
    groups ("K", "K_enc/K_dec", or "" for models without groups such as fairseq's own),
    rearrangement, sharing rate, tied embeddings."""
    get = lambda k, d=None: getattr(m, k, d) if not isinstance(m, dict) else m.get(k, d)  # noqa: E731
    enc, dec = get("encoder_groups"), get("decoder_groups")
    if enc is not None and enc != dec:
        groups = f"{enc}/{dec}"
    else:
        groups = "" if dec is None else str(dec)
    if get("encoder_embed_dim") is not None:  # encoder-decoder
        tied = "all" if get("share_all_embeddings") else (
            "decoder" if get("share_decoder_input_output_embed") else "no")
    else:
        tied = "yes" if get("share_decoder_input_output_embed") else "no"
    return {"arch": get("arch") or get("_name"), "cell": get("cell"), "groups": groups,
            "rearrangement": get("rearrangement"), "sharing_rate": get("sharing_rate"),
            "tied": tied}


def device_name(train_opts, env):
    try:
        import torch

        if not train_opts.get("cpu") and torch.cuda.is_available():
            return "cuda: " + torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        if names:
            cpu = names[0].strip()
    except OSError:
        pass
    threads = env.get("OMP_NUM_THREADS")
    extra = f", {threads} thread{'s' if threads != '1' else ''}" if threads else ""
    return f"cpu: {cpu} ({os.cpu_count()} cores{extra})"


def recorded_env(run, env):
    """``export K=V ...`` for the variables that change what a run computes or how fast: the
    config's ``env`` with the values the run really had (the caller's environment wins) and
    every ``GRNN_*`` variable that was set (engine, kernels).  '' when there are none."""
    keys = list(run.env) + sorted(k for k in env if k.startswith("GRNN_") and k not in run.env)
    pairs = [f"{k}={shlex.quote(env[k])}" for k in keys if k in env]
    return "export " + " ".join(pairs) if pairs else ""


def append_row(path, row):
    """Append ``row`` to the TSV at ``path``, under a lock (runs side by side share a file).

    A new file gets the header. A file with an older header is rewritten to the current
    columns first, field by field (rows are never re-parsed as CSV, so quotes in old rows are
    kept), and columns the current version no longer writes stay at the end with their
    values."""
    import fcntl
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: ("" if row.get(k) is None else str(row.get(k)).replace("\t", " ").replace("\n", " "))
             for k in COLUMNS}
    with open(path, "a+", encoding="utf-8", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        f.seek(0)
        lines = f.read().splitlines()
        header = lines[0].split("\t") if lines else list(COLUMNS)
        extra = [c for c in header if c not in COLUMNS]
        if lines and header != list(COLUMNS) + extra:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
                out.write("\t".join(list(COLUMNS) + extra) + "\n")
                for line in lines[1:]:
                    old = dict(zip(header, line.split("\t")))
                    out.write("\t".join(old.get(k, "") for k in list(COLUMNS) + extra) + "\n")
                out.write("\t".join([clean[k] for k in COLUMNS] + [""] * len(extra)) + "\n")
            os.replace(tmp, path)
            return
        if not lines:
            f.write("\t".join(COLUMNS) + "\n")
        f.write("\t".join([clean[k] for k in COLUMNS] + [""] * len(extra)) + "\n")


def fmt(v, places=2):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{places}f}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


def execute(run, results, env, show):
    """Train, average, evaluate one run; append its row; return the row."""
    run.save_dir.mkdir(parents=True, exist_ok=True)
    timing_path = run.save_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"train_seconds": 0.0}
    notes = []
    if (run.save_dir / "checkpoint_last.pt").exists():
        print(f"[{run.name}] resuming from {rel(run.save_dir / 'checkpoint_last.pt')}", flush=True)
    train_cmd = run.train_cmd()
    log_path = run.save_dir / "train.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    t0 = time.time()
    try:
        run_logged(train_cmd, log_path, env, show=show)
    finally:
        # fairseq's own figure when it finished (without start-up), else the wall clock
        with open(log_path, "rb") as f:
            f.seek(start)
            this = f.read().decode("utf-8", errors="replace")
        done = re.findall(r"done training in ([\d.]+) seconds", this)
        timing["train_seconds"] += float(done[-1]) if done else time.time() - t0
        timing_path.write_text(json.dumps(timing))
    train = parse_train_log(log_path.read_text(encoding="utf-8", errors="replace"))

    have = epoch_checkpoints(run.save_dir)
    if not have and (run.save_dir / "checkpoint_last.pt").exists():
        notes.append("no epoch checkpoint (stopped inside epoch 1 by max-update or "
                     "stop-time-hours): evaluated checkpoint_last.pt")
    elif not have:
        raise CommandError(f"{run.name}: fairseq-train wrote no checkpoint in "
                           f"{rel(run.save_dir)} (train.no-save set?)")
    n = min(run.average, len(have))
    paths = None
    partial = stopped_inside_epoch(log_path.read_text(encoding="utf-8", errors="replace"))
    if have and partial and (run.save_dir / "checkpoint_last.pt").exists():
        # the epoch checkpoints end before the final updates: checkpoint_last.pt is the
        # newest of the averaged checkpoints (else the row's updates would not be the
        # evaluated model's)
        older = have[-(run.average - 1):] if run.average > 1 else []
        paths = [run.save_dir / f"checkpoint{e}.pt" for e in older] + [run.save_dir / "checkpoint_last.pt"]
        n = len(paths)
        notes.append(f"stopped inside epoch {partial[0]} at {partial[1]} updates: averaged "
                     + (f"epoch checkpoints {older[0]}..{older[-1]} and " if older else "")
                     + "checkpoint_last.pt")
    if 0 < n < run.average:
        notes.append(f"averaged {n} of {run.average} checkpoints")
    cmds = run.commands(n_average=n, average_paths=paths)
    executed = [x for x in (recorded_env(run, env), shell(train_cmd)) if x]
    row = {"experiment": run.experiment, "run": run.name, "task": run.task,
           "data": rel(run.data_dir), "seed": run.seed}
    for label, cmd, stdin in cmds[1:]:
        out = run.stdout_of(label)  # None, or the file its stdout goes to
        if label == "average":
            run_logged(cmd, run.save_dir / "average.log", env, show=show)
        elif label == "evaluate" and run.task == "lm":
            run_logged(cmd, run.save_dir / f"eval-{run.subset}.log", env, show=show)
            scores = parse_eval_lm(last_logged(run.save_dir / f"eval-{run.subset}.log"))
            if not scores:
                raise CommandError(f"{run.name}: no perplexity in fairseq-eval-lm's output "
                                   f"({rel(run.save_dir / f'eval-{run.subset}.log')})")
            row.update(scores)
        elif label == "evaluate":
            run_logged(cmd, run.save_dir / f"generate-{run.subset}.log", env, show=show,
                       stdout_path=out)
            hyps, refs, scores = parse_generate(out.read_text(encoding="utf-8", errors="replace"))
            if not scores:
                raise CommandError(f"{run.name}: no score line in fairseq-generate's output ({rel(out)})")
            if show:
                print("  " + scores["line"], flush=True)
            # fairseq's speed line goes to its log (stderr), not to the hypotheses
            log_text = last_logged(run.save_dir / f"generate-{run.subset}.log")
            row["gen_tps"] = parse_generate(log_text)[2].get("gen_tps")
            if run.task == "translation":
                row["bleu"] = scores.get("bleu")
            else:
                row.update({k: scores.get(k) for k in ("rouge1", "rouge2", "rougeL")})
            (run.save_dir / f"{run.subset}.hyp").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
            (run.save_dir / f"{run.subset}.ref").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
            if run.task == "translation" and "tokenized_bleu" in run.metrics:
                spec = run.spec.get("tokenized_bleu") or {}
                tok, desc = tokenizer(spec.get("tokenizer", "13a"), spec.get("lang"))
                for name, lines in (("hyp", hyps), ("ref", refs)):
                    (run.save_dir / f"{run.subset}.{name}.tok").write_text(
                        "".join(tok(x) + "\n" for x in lines), encoding="utf-8")
                notes.append(f"bleu_tok: fairseq-score, tokenizer {desc}")
        elif label == "score":
            log = run.save_dir / f"score-{run.subset}.log"
            run_logged(cmd, log, env, show=show)
            m = re.search(r"BLEU4 = ([\d.]+)", last_logged(log))
            row["bleu_tok"] = float(m.group(1)) if m else None
        elif label == "interactive":
            lines = [str(x) for x in run.interactive["inputs"]]
            (ROOT / stdin).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
            run_logged(cmd, run.save_dir / "interactive.log", env, show=False, stdout_path=out,
                       stdin_path=stdin)
            text = out.read_text(encoding="utf-8", errors="replace")
            got = {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", text, re.M)}
            print(f"[{run.name}] translations (fairseq-interactive, {rel(out)}):")
            for i, src in enumerate(lines):
                print(f"  {src}\n    -> {got.get(i, '(none)')}")
        executed.append(shell(cmd, stdin, out and rel(out)))  # as --dry-run prints it

    info = model_info(run.checkpoint, run.data_dir)
    row.update(info)
    row.update({"train_wall_s": round(timing["train_seconds"], 1),
                "train_wps": round(train["wps"], 1) if train.get("wps") else None,
                "epochs": train.get("epochs"), "updates": train.get("updates"),
                "device": device_name(run.train_opts, env),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "commands": " && ".join(executed), "notes": "; ".join(notes)})
    append_row(results, row)
    return row


def summary(rows):
    """A Markdown table of finished runs."""
    metric_cols = [c for c in ("bleu", "bleu_tok", "rouge1", "rouge2", "rougeL", "ppl")
                   if any(r.get(c) is not None for r in rows)]
    head = ["run", "arch", "params"] + metric_cols + ["train time", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r.get("arch") or "-", fmt(r.get("params"))]
        cells += [fmt(r.get(c)) for c in metric_cols]
        secs = r.get("train_wall_s")
        took = "-" if not secs else f"{secs:.0f} s" if secs < 60 else f"{secs / 60:.1f} min"
        cells += [took, fmt(r.get("train_wps"), 0)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def dry_run_script(runs, results, prepare=False):
    """The lines --dry-run prints: a bash script that runs the commands as the runner would
    (from the repository root, with the config's env, into the same files; with
    ``prepare``, missing data folders first), and ``#`` lines for what the runner does in
    Python between them."""
    lines = ["# run_experiment.py --dry-run: bash runs these lines as the runner would; '#' lines",
             "# say what the runner does itself. A config's env applies where it is not set.",
             shell(["cd", str(ROOT)])]
    missing = set()
    for run in runs:  # as _main: every missing data folder before any training
        if run.data_dir in missing:
            continue
        try:
            run.check_data()
        except ConfigError:
            missing.add(run.data_dir)
            argv = run.prepare_cmd() if prepare else []
            if not argv:
                lines.append(f"# data folder {rel(run.data_dir)} is missing or incomplete: the "
                             "runner stops before any training; --prepare runs the config's "
                             f"data.prepare: {run.spec['data'].get('prepare') or '(none)'}")
            else:
                # _main's environment for it: this Python's tools first on PATH, and PYTHON
                lines.append(f"PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH "
                             f"PYTHON=${{PYTHON-{shlex.quote(sys.executable)}}} {shell(argv)}")
    for run in runs:
        save = rel(run.save_dir)
        lines.append(f"# {run.experiment} / {run.name}  (save dir {save})")
        lines.append(shell(["mkdir", "-p", save]))
        env = "".join(f"{key}=${{{key}-{shlex.quote(value)}}} " for key, value in run.env.items())
        for label, cmd, stdin in run.commands():
            if label == "average":
                lines.append("# the runner averages the epoch checkpoints that training left "
                             "(fewer when it saved fewer), with checkpoint_last.pt as the newest "
                             "when max-update or stop-time-hours stopped it inside an epoch")
            elif label == "score":
                spec = run.spec.get("tokenized_bleu") or {}
                tokenized = tokenizer(spec.get("tokenizer", "13a"), spec.get("lang"))[1]
                lines.append(f"# the runner writes the D- and T- lines of "
                             f"{rel(run.stdout_of('evaluate'))} to {run.subset}.hyp / "
                             f"{run.subset}.ref, and tokenized ({tokenized}) to "
                             f"{run.subset}.hyp.tok / {run.subset}.ref.tok in {save}")
            elif label == "interactive":
                lines.append(shell(["printf", r"%s\n", *map(str, run.interactive["inputs"])],
                                   stdout=stdin))
            out = run.stdout_of(label)
            lines.append(env + shell(cmd, stdin, out and rel(out)))
        lines.append(f"# the runner reads the scores, epochs, updates and speed from the output "
                     f"(logged in {save}), counts the parameters of {rel(run.checkpoint)} and "
                     f"appends one row to {results}")
    return lines


def check_commands(runs):
    """Parse every run's fairseq commands with fairseq's own parsers before any training, so
    that a misspelled ``generate.*`` or ``eval_lm.*`` option (``generate.beem=5``) stops
    the sweep now, not after the first run has trained. Skipped without fairseq."""
    try:
        from fairseq import options
    except ImportError:
        return
    parsers = {"fairseq-train": options.get_training_parser,
               "fairseq-generate": options.get_generation_parser,
               "fairseq-interactive": options.get_interactive_generation_parser,
               "fairseq-eval-lm": options.get_eval_lm_parser}
    here = os.getcwd()
    os.chdir(ROOT)  # the commands run in the repository root (--user-dir grnn_fairseq)
    try:
        for run in runs:
            for label, cmd, _ in run.commands():
                tool = Path(cmd[0]).name
                if tool not in parsers:
                    continue
                try:
                    options.parse_args_and_arch(parsers[tool](), cmd[1:])
                except SystemExit:  # argparse has printed what it rejects
                    raise ConfigError(f"{run.name}: {tool} rejects the options above (the "
                                      f"config's or --override's); nothing was trained") from None
    finally:
        os.chdir(here)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML file of configs/")
    p.add_argument("--only", nargs="+", metavar="RUN",
                   help="run only these runs (names or shell patterns, e.g. 'ptb_lstm_*')")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands as a bash script (what the runner does itself "
                        "between them as # lines), run nothing")
    p.add_argument("--list", action="store_true", help="print the run names and exit")
    p.add_argument("--seed", type=int, help="training seed (default: the config's train.seed or 1)")
    p.add_argument("--results", help="results TSV (default: results/<experiment>.tsv)")
    p.add_argument("--override", action="append", default=[], metavar='"KEY=VALUE ..."',
                   help="change settings of every run, e.g. \"train.max-epoch=1 train.lr=0.1\" "
                        "or \"data.path=/data/ptb\" (repeatable)")
    p.add_argument("--work-dir", default=str(ROOT / "work"),
                   help="checkpoints and logs go to WORK_DIR/<experiment>/<run>/seed<N>/")
    p.add_argument("--prepare", action="store_true",
                   help="run the config's data.prepare command when the data folder is missing")
    p.add_argument("--quiet", action="store_true", help="do not echo fairseq's progress")
    p.add_argument("--verbose", action="store_true", help="echo all of fairseq's output")
    a = p.parse_args(argv)
    try:
        return _main(a)
    except ConfigError as err:
        print(f"run_experiment.py: error: {err}", file=sys.stderr)
        return 2
    except CommandError as err:
        print(f"run_experiment.py: {err}", file=sys.stderr)
        return 1


def _main(a):
    cfg = load_config(a.config)
    experiment = str(cfg["experiment"])
    specs = expand_runs(cfg)
    overrides = [kv for text in a.override for kv in parse_override(text)]
    for spec in specs.values():
        for key, value in overrides:
            set_dotted(spec, key, value)
    if a.list:
        print("\n".join(specs))
        return 0
    names = list(specs)
    if a.only:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in a.only)]
        unknown = [pat for pat in a.only if not any(fnmatch.fnmatchcase(n, pat) for n in specs)]
        if unknown:
            raise ConfigError(f"--only: no run matches {', '.join(unknown)}; runs: {', '.join(specs)}")
    runs = [Run(experiment, n, specs[n], a.work_dir, a.seed) for n in names]
    results = Path(a.results) if a.results else ROOT / "results" / f"{experiment}.tsv"

    if a.dry_run:
        print("\n".join(dry_run_script(runs, results, a.prepare)))
        return 0

    env = dict(os.environ)
    # the fairseq tools and the prepare scripts of this Python's environment come first
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHON", sys.executable)
    for run in runs:  # fail before any training when a data folder is missing
        try:
            run.check_data()
        except ConfigError:
            argv = run.prepare_cmd()
            if not (a.prepare and argv):
                raise
            log = Path(a.work_dir) / experiment / "prepare.log"
            run_logged(argv, log, env, show=a.verbose and "all")
            print(f"  prepared {rel(run.data_dir)} (log: {rel(log)})", flush=True)
            run.check_data()
    check_commands(runs)
    rows = []
    for i, run in enumerate(runs, 1):
        print(f"\n=== [{i}/{len(runs)}] {experiment} / {run.name}  ({run.arch}, save dir "
              f"{rel(run.save_dir)})", flush=True)
        run_env = dict(env)
        for key, value in run.env.items():
            run_env.setdefault(key, value)  # the caller's environment wins
        row = execute(run, results, run_env, show="all" if a.verbose else not a.quiet)
        rows.append(row)
        print(f"[{run.name}] done: appended to {results}", flush=True)
    print(f"\n{experiment}: {len(rows)} run(s), results in {results}\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
