#!/usr/bin/env python
"""Markdown tables and plots from the results TSVs of scripts/run_experiment.py.

    python scripts/report.py results/*.tsv [--out results/report]

Writes OUT/report.md: per experiment, a table of its runs (the latest row of each run and
seed; several seeds are averaged, with the standard deviation, and a warning when they
trained unequal budgets), and PNG plots like the papers' figures:

* experiments over the number of groups K: parameters, training speed (target tokens/s)
  and the metric against K (one line per rearrangement setting and data set);
* experiments over sharing rates r: the metric against the parameter count, one line
  per cell type / embedding setting, each point labelled with r.

The plots need matplotlib (``pip install matplotlib``, or the project's ``report`` extra);
without it the Markdown is still written.
"""
import argparse
import csv
import math
import re
import shlex
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path

METRICS = {  # task -> [(column, label, lower is better)]
    "translation": [("bleu", "BLEU (sacrebleu)", False), ("bleu_tok", "BLEU (tokenized)", False)],
    "summarization": [("rouge1", "ROUGE-1", False), ("rouge2", "ROUGE-2", False),
                      ("rougeL", "ROUGE-L", False)],
    "lm": [("ppl", "test perplexity", True)],
}
NUMERIC = ("params", "bleu", "bleu_tok", "rouge1", "rouge2", "rougeL", "ppl", "loss",
           "train_wall_s", "train_wps", "gen_tps", "epochs", "updates")
INSTALL_HINT = ("matplotlib is not installed, so no plots were drawn; install it with\n"
                "    pip install matplotlib        (or: pip install -e \".[report]\")")


def number(text):
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def groups_of(text):
    """'4' -> 4, '2/4' (encoder/decoder) -> 2, '' -> None."""
    m = re.match(r"\s*(\d+)", str(text or ""))
    return int(m.group(1)) if m else None


def read_rows(paths):
    rows = []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if not reader.fieldnames or "experiment" not in reader.fieldnames:
                raise ValueError(f"{path}: not a results TSV of run_experiment.py (no header)")
            for row in reader:
                row["_file"] = str(path)
                rows.append(row)
    return rows


def save_dir_of(row):
    """The ``--save-dir`` of the row's fairseq-train command (None if not recorded)."""
    try:
        words = shlex.split(row.get("commands") or "")
    except ValueError:
        return None
    for i, word in enumerate(words[:-1]):
        if word == "--save-dir":
            return words[i + 1]
    return None


def unequal_budgets(group):
    """What each row of ``group`` (the seeds of one run) trained, as "seed 1: 10 epochs,
    1000 updates; seed 2: ...", when their epochs or updates differ (a seed stopped by a
    time limit, continued further, or run with another max-epoch); else None."""
    if all(len({number(r.get(c)) for r in group} - {None}) < 2 for c in ("epochs", "updates")):
        return None

    def budget(r):
        stopped = re.search(r"stopped inside epoch \d+", r.get("notes") or "")
        return (f"seed {r.get('seed') or '?'}: {r.get('epochs') or '?'} epochs, "
                f"{r.get('updates') or '?'} updates"
                + (f" ({stopped.group(0)})" if stopped else ""))
    return "; ".join(budget(r) for r in group)


def aggregate(rows):
    """{experiment: [run summary]}: the latest row (by date) per training run (its save
    dir: a continued or re-evaluated run), then the mean (and standard deviation) over
    seeds of the runs that differ only in the seed (same data, same work dir); runs in
    their first-seen order.  Runs of the same name trained elsewhere (another data set or
    work dir) are kept apart, labelled with what differs.  ``unequal_budgets`` says what
    each seed trained when the averaged seeds trained unequal budgets."""
    latest, first_seen, patterns = {}, {}, {}
    for i in sorted(range(len(rows)), key=lambda i: rows[i].get("date") or ""):  # stable
        row = rows[i]
        save = save_dir_of(row)
        key = (row["experiment"], row["run"], row.get("data") or "",
               save if save is not None else "seed" + str(row.get("seed") or ""))
        first_seen[key] = min(first_seen.get(key, i), i)
        latest[key] = row
        # the seeds of one run: the same save dir but for its seed<N> folder
        patterns[key] = re.sub(r"seed\d+/*$", "seed*", save) if save is not None else ""
    relative = {p for p in patterns.values() if p and not p.startswith("/")}
    for key, pattern in patterns.items():
        # an absolute save dir (--work-dir given as an absolute path) is the relative one
        # of another row when it ends with it (runs record paths relative to the root)
        same = [r for r in relative if pattern.startswith("/") and pattern.endswith("/" + r)]
        if same:
            patterns[key] = max(same, key=len)
    by_run = OrderedDict()
    for key in sorted(latest, key=lambda k: first_seen[k]):
        exp, run, data, _ = key
        by_run.setdefault((exp, run, data, patterns[key]), []).append(latest[key])
    names = defaultdict(list)
    for exp, run, data, pattern in by_run:
        names[(exp, run)].append((data, pattern))
    out = OrderedDict()
    for (exp, run, data, pattern), group in by_run.items():
        last = group[-1]
        s = {k: last.get(k, "") for k in last}
        if len(names[(exp, run)]) > 1:  # the same run name trained more than one way
            where = pattern
            tail = f"/{exp}/{run}/seed*"
            if where.endswith(tail):
                where = where[:-len(tail)] or "."
            if len({p for _, p in names[(exp, run)]}) < len(names[(exp, run)]):
                where = data  # the same work dir: told apart by the data
            s["run"] = f"{run} ({where})"
        s["n"] = len(group)
        # seeds trained on different machines: name them all (time and tok/s are means)
        by_date = sorted(group, key=lambda g: g.get("date") or "")
        s["device"] = " / ".join(dict.fromkeys(g["device"] for g in by_date if g.get("device")))
        s["unequal_budgets"] = unequal_budgets(group)
        s["groups_k"] = groups_of(last.get("groups"))
        s["r"] = number(last.get("sharing_rate"))
        for col in NUMERIC:
            vals = [v for v in (number(g.get(col)) for g in group) if v is not None]
            s[col] = sum(vals) / len(vals) if vals else None
            s[col + "_std"] = (math.sqrt(sum((v - s[col]) ** 2 for v in vals) / (len(vals) - 1))
                               if len(vals) > 1 else None)
        out.setdefault(exp, []).append(s)
    return out


def cell(s, col, places=2):
    v = s.get(col)
    if v is None:
        return "-"
    if col == "params":
        return f"{int(round(v)):,d}"
    if col in ("epochs", "updates"):
        return f"{int(round(v))}"
    if col == "train_wall_s":
        return f"{v / 3600:.2f} h" if v >= 3600 else f"{v / 60:.1f} min"
    if col in ("train_wps", "gen_tps"):
        return f"{v:,.0f}"
    text = f"{v:.{places}f}"
    std = s.get(col + "_std")
    return text + (f" ± {std:.{places}f}" if std is not None else "")


def task_of(runs):
    return (runs[0].get("task") or "translation") if runs else "translation"


def metric_cols(runs):
    return [(c, label, low) for c, label, low in METRICS.get(task_of(runs), [])
            if any(s.get(c) is not None for s in runs)]


def markdown_table(runs):
    mcols = metric_cols(runs)
    seeds = any(s["n"] > 1 for s in runs)
    gen = any(s.get("gen_tps") is not None for s in runs)
    head = (["run", "data", "arch", "K", "rearr.", "r", "tied", "params"] + [l for _, l, _ in mcols]
            + ["train time", "train tok/s"] + (["generate tok/s"] if gen else [])
            + ["epochs", "updates", "device"] + (["seeds"] if seeds else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in runs:
        data = Path(s.get("data") or "-").parts
        data = "/".join(p for p in data if p not in ("data-bin",)) or "-"
        run = s["run"] + (" ⚠" if s["unequal_budgets"] else "")  # see budget_warnings
        row = [run, data, f"`{s.get('arch') or '-'}`", s.get("groups") or "-",
               s.get("rearrangement") or "-", s.get("sharing_rate") or "-", s.get("tied") or "-",
               cell(s, "params")] + [cell(s, c) for c, _, _ in mcols]
        row += [cell(s, "train_wall_s"), cell(s, "train_wps")] + (
            [cell(s, "gen_tps")] if gen else []) + [cell(s, "epochs"), cell(s, "updates"),
                s.get("device") or "-"] + ([str(s["n"])] if seeds else [])
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def budget_warnings(runs):
    """One warning per run whose mean is over seeds that trained unequal budgets."""
    return [f"{s['run']}: the mean over {s['n']} seeds mixes unequal training budgets "
            f"({s['unequal_budgets']}); continue the shorter seeds to the same budget "
            "(run_experiment.py continues from checkpoint_last.pt) before comparing it"
            for s in runs if s["unequal_budgets"]]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _data_label(s):
    parts = [p for p in Path(s.get("data") or "").parts if p not in ("data-bin", "work", "data")]
    return parts[-1] if parts else "data"


def group_series(pts):
    """{(data, model family, rearrangement): runs}: the lines of the groups plot.  The
    family is the arch without its _k<K> suffix (a baseline ``X`` joins ``group_X``, as
    ``rnnsearch`` joins ``group_rnnsearch_k2``); a family run at one K only (e.g.
    restricted models with r = 0 in the same results file) draws no line."""
    family_of = [re.sub(r"_k\d+$", "", s.get("arch") or "-") for s in pts]
    families = set(family_of)
    series = defaultdict(list)
    for s, family in zip(pts, family_of):
        if "group_" + family in families:  # the K = 1 baseline of a group family (rnnsearch)
            family = "group_" + family
        series[(_data_label(s), family, s.get("rearrangement") or "-")].append(s)
    ks_of = defaultdict(set)
    for (data, family, _), ss in series.items():
        ks_of[(data, family)].update(s["groups_k"] for s in ss)
    return {key: ss for key, ss in series.items() if len(ks_of[key[:2]]) > 1}


def plot_groups(plt, exp, runs, out_dir):
    """Parameters, speed and metrics vs the number of groups (runs with r = 0)."""
    pts = [s for s in runs if s["groups_k"] is not None and not s["r"]]
    if len({s["groups_k"] for s in pts}) < 2:
        return None
    mcols = metric_cols(pts)
    panels = [("params", "parameters (M)", 1e-6), ("train_wps", "train target tokens/s", 1)]
    panels += [(c, label, 1) for c, label, _ in mcols]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    series = group_series(pts)
    multi_data = len({k[0] for k in series}) > 1
    multi_family = len({k[1] for k in series}) > 1
    for ax, (col, label, scale) in zip(axes[0], panels):
        for (data, family, rearr), ss in sorted(series.items()):
            ss = sorted((s for s in ss if s.get(col) is not None), key=lambda s: s["groups_k"])
            if not ss:
                continue
            name = ((f"{data}, " if multi_data else "") + (f"{family}, " if multi_family else "")
                    + f"rearrangement {rearr}")
            ax.plot([s["groups_k"] for s in ss], [s[col] * scale for s in ss], "o-", label=name)
        ax.set_xscale("log", base=2)
        ks = sorted({s["groups_k"] for s in pts})
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("groups K")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
        fig.subplots_adjust(bottom=0.3)
    fig.suptitle(f"{exp}: parameters, speed and quality vs number of groups")
    fig.tight_layout(rect=(0, 0.12 if len(labels) > 1 else 0, 1, 0.95))
    path = out_dir / f"{exp}_groups.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sharing(plt, exp, runs, out_dir):
    """Metric vs parameters across sharing rates: one panel per data set, one line per
    (cell, embeddings), points labelled with r."""
    pts = [s for s in runs if s["r"] is not None and s.get("params") is not None]
    if len({s["r"] for s in pts}) < 2:
        return None
    mcols = metric_cols(pts)
    if not mcols:
        return None
    col, label, _ = mcols[0] if task_of(pts) != "translation" else mcols[-1]
    datasets = sorted({_data_label(s) for s in pts})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        series = defaultdict(list)
        for s in pts:
            if _data_label(s) == data and s.get(col) is not None:
                series[(s.get("cell") or "-", s.get("tied") or "-",
                        s.get("groups") or "1")].append(s)
        for (cellname, tied, k), ss in sorted(series.items()):
            if len({s["r"] for s in ss}) < 2:
                continue  # not a sweep over r (e.g. group-LSTM runs in the same file)
            ss = sorted(ss, key=lambda s: s["params"])
            name = f"{cellname}, tied {tied}" + (f", K={k}" if k not in ("1", "-") else "")
            ax.plot([s["params"] / 1e6 for s in ss], [s[col] for s in ss], "o-", label=name)
            for s in ss:
                ax.annotate(f"r={s['r']:g}", (s["params"] / 1e6, s[col]), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(label)
        ax.set_title(data)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{exp}: {label} vs parameters across sharing rates")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = out_dir / f"{exp}_sharing_rate.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(tsvs, out_dir):
    """Write out_dir/report.md (+ PNGs when matplotlib is importable); return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    experiments = aggregate(read_rows(tsvs))
    plt = _pyplot()
    if plt is None:
        print(INSTALL_HINT, file=sys.stderr)
    md = ["# Results", "", "From: " + ", ".join(f"`{p}`" for p in tsvs), ""]
    if not experiments:
        md.append("No results yet.")
    for exp, runs in experiments.items():
        md += [f"## {exp}", "", markdown_table(runs), ""]
        for warning in budget_warnings(runs):
            md += [f"⚠ {warning}", ""]
            print(f"report.py: warning: {exp} / {warning}", file=sys.stderr)
        if plt is not None:
            for fn in (plot_groups, plot_sharing):
                path = fn(plt, exp, runs, out_dir)
                if path:
                    md += [f"![{path.stem}]({path.name})", ""]
        else:
            md += ["(plots: install matplotlib and rerun scripts/report.py)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tsv", nargs="+", help="results TSVs written by scripts/run_experiment.py")
    p.add_argument("--out", default="results/report", help="output folder (default: results/report)")
    a = p.parse_args(argv)
    missing = [t for t in a.tsv if not Path(t).is_file()]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")
    try:
        report = write_report(a.tsv, a.out)
    except ValueError as err:
        p.error(str(err))
    print(f"wrote {report}")
    for png in sorted(Path(a.out).glob("*.png")):
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
