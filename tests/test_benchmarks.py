"""The benchmark scripts run and print well-formed tables (their --quick smoke modes on
CPU; the numbers themselves are meaningless there and not checked)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _bench_layer_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_layer", ROOT / "scripts" / "bench_layer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_layer_quick_prints_every_case():
    out = _run([sys.executable, "scripts/bench_layer.py", "--quick"])
    rows = [line.split() for line in out.splitlines()
            if line.split()[:1] in (["train"], ["infer"], ["decode"])]
    modes = {r[0] for r in rows}
    assert modes == {"train", "infer", "decode"}
    for mode in modes:
        first = next(r for r in rows if r[0] == mode)
        assert first[1] in ("nn.LSTM", "nn.LSTMCell") and float(first[-2]) == 1.0
        groups = {r[3] for r in rows if r[0] == mode and r[1] == "group"}
        assert {"1", "4", "16"} <= groups
    for r in rows:
        assert all(float(v) > 0 for v in r[-4:])
    # the shuffle's cost of every group case, from the table's times (printed to 0.01 ms:
    # the cost may differ from the table's quotient by what that rounding allows)
    by_mode = _shuffle_cost_blocks(out)
    assert set(by_mode) == {"train", "infer", "decode"}, out
    for mode, block in by_mode.items():
        group = {(r[3], r[4], r[5]): r for r in rows if r[0] == mode and r[1] == "group"}
        expected = {(k, b) for (k, rr, b) in group if rr == "time" and (k, "none", b) in group}
        assert set(block) == expected != set(), out
        for (k, b), (med, low) in block.items():
            for col, printed in ((-4, med), (-3, low)):
                t, n = float(group[k, "time", b][col]), float(group[k, "none", b][col])
                slack = ((t + 0.005) / (n - 0.005) - t / n) * 100 + 0.05
                assert abs(printed - (t / n - 1) * 100) <= slack, (mode, k, b, printed, t, n)


def _shuffle_cost_blocks(out):
    """bench_layer.py's shuffle-cost lines, by the mode of the table above them ->
    {mode: {(K, backend): (% by the median, % by the min)}}."""
    blocks, mode = {}, None
    for line in out.splitlines():
        if line.split()[:1] in (["train"], ["infer"], ["decode"], ["steps"]):
            mode = line.split()[0]
        m = re.match(r"  group \S+ K=(\d+) (\S+): ([+-][\d.]+)% / ([+-][\d.]+)%$", line)
        if m:
            blocks.setdefault(mode, {})[m.group(1), m.group(2)] = (float(m.group(3)),
                                                                 float(m.group(4)))
    return blocks


def test_shuffle_costs_pair_each_case_with_its_unshuffled_twin():
    bench = _bench_layer_module()
    row = dict(mode="train", model="group LSTM", K=4, backend="cpp")
    rows = [dict(row, rearr="none", ms=10.0, min=8.0), dict(row, rearr="time", ms=11.0, min=8.4),
            dict(row, K=16, rearr="time", ms=5.0, min=5.0),        # no twin: left out
            dict(row, backend="torch", rearr="none", ms=30.0, min=30.0),
            dict(row, backend="torch", rearr="time", ms=27.0, min=24.0),
            dict(row, mode="infer", rearr="time", ms=1.0, min=1.0)]  # twin of another mode: none
    costs = bench.shuffle_costs(rows)
    assert [c[0] for c in costs] == ["group LSTM K=4 cpp", "group LSTM K=4 torch"]
    assert costs[0][1:] == pytest.approx((0.1, 0.05)) and costs[1][1:] == pytest.approx((-0.1, -0.2))


def test_bench_layer_steps_with_autograd():
    """Mode steps (a decoder trained step by step): nn.LSTMCell with autograd first, then
    every group case; an unknown mode is refused with the list of modes."""
    out = _run([sys.executable, "scripts/bench_layer.py", "--quick", "--modes", "steps",
                "--groups", "1,4", "--backend", "auto,reference"])
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["steps"]]
    assert rows[0][1] == "nn.LSTMCell" and float(rows[0][-2]) == 1.0
    assert {(r[3], r[4], r[5]) for r in rows[1:]} == {
        (k, rr, b) for k in ("1", "4") for rr in ("none", "time") for b in ("auto", "reference")}
    assert all(float(v) > 0 for r in rows for v in r[-4:])
    proc = subprocess.run([sys.executable, "scripts/bench_layer.py", "--quick", "--modes",
                           "step"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0 and "unknown mode 'step' (train|infer|decode|steps)" in proc.stderr


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_bench_layer_other_cells_compare_with_torch(cell):
    out = _run([sys.executable, "scripts/bench_layer.py", "--quick", "--cell", cell,
                "--groups", "1,4", "--backend", "auto,reference"])
    assert f"cell {cell}" in out
    name = cell.upper()
    rows = [line.split() for line in out.splitlines()
            if line.split()[:1] in (["train"], ["infer"], ["decode"])]
    assert {r[1] for r in rows if r[0] == "decode"} == {f"nn.{name}Cell", "group"}
    assert {r[1] for r in rows if r[0] == "train"} == {f"nn.{name}", "group"}
    assert {(r[3], r[5]) for r in rows if r[0] == "train" and r[1] == "group"} == {
        (k, b) for k in ("1", "4") for b in ("auto", "reference")}


def test_bench_attention_quick_prints_both_cases_of_each_mode():
    """scripts/bench_attention.py --quick: PyTorch's attention and the fused kernels
    (Triton's interpreter) in both modes, PyTorch's first with ratio 1; where the fused
    attention cannot run, a message says why instead of a table of one case."""
    pytest.importorskip("triton")
    out = _run([sys.executable, "scripts/bench_attention.py", "--quick"])
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["train"],
                                                                           ["decode"])]
    assert [r[:2] for r in rows] == [["train", "torch"], ["train", "triton"],
                                     ["decode", "torch"], ["decode", "triton"]], out
    assert rows[0][-1] == rows[2][-1] == "1.00x" and out.startswith("# python")
    env = dict(os.environ, GRNN_BACKEND="torch")
    proc = subprocess.run([sys.executable, "scripts/bench_attention.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "the fused attention does not run here" in proc.stderr


def test_bench_attention_refuses_an_unknown_mode_before_it_runs():
    """--modes with a mode other than train or decode: an argparse error naming the mode
    and the choices, before any header or timing."""
    proc = subprocess.run([sys.executable, "scripts/bench_attention.py", "--quick", "--modes",
                           "train,infer"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--modes: 'infer' is not train or decode" in proc.stderr and not proc.stdout


def test_bench_fairseq_quick_with_warmup(tmp_path):
    """Our RNNSearch and fairseq's own LSTM through fairseq-train / -generate; the warm-up
    run happens (its log exists) and the timed run still reports its figures; every
    hypothesis has the asked length (7 tokens + EOS, from generate's own count)."""
    models = "group_rnnsearch_k4 lstm_wiseman_iwslt_de_en"
    args = ["--quick", "--models", models, "--warmup-updates", "2", "--gen-length", "7",
            "--workdir", str(tmp_path)]
    out = _run(["bash", "scripts/bench_fairseq.sh"] + args)
    assert "after 2 untimed" in out
    # the command it prints reruns it: the list of models stays one argument
    printed = re.search(r"^== command: (.*)$", out, re.M).group(1)
    assert shlex.split(printed) == ["scripts/bench_fairseq.sh"] + args, printed
    for tag in ("group_rnnsearch_k4.auto", "lstm_wiseman_iwslt_de_en"):
        log = (tmp_path / f"generate.{tag}.log").read_text()
        sents, toks = re.search(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\)", log).groups()
        assert int(toks.replace(",", "")) == 8 * int(sents.replace(",", "")) > 0, log[-500:]
    table = _fairseq_table(out)
    assert set(table) == {"group_rnnsearch_k4.auto", "lstm_wiseman_iwslt_de_en"}, out
    for figures in table.values():
        assert all(v > 0 for v in figures)
    for tag in table:
        assert (tmp_path / f"warmup.{tag}.log").exists()
        train_log = (tmp_path / f"train.{tag}.log").read_text()
        assert "done training" in train_log
        # every log interval's wps is listed, the first (left out of the median) included
        intervals = re.search(rf"^  {re.escape(tag)}: (.*)$", out, re.M).group(1).split()
        assert intervals == re.findall(r"\bwps=([\d.]+)", train_log) != [], out
    # the ratio of our model to fairseq's, from the table's own figures; fairseq's model is
    # a reference only
    assert _ratio_rows(out) == _expected_ratios(
        table, [("group_rnnsearch_k4.auto", "lstm_wiseman_iwslt_de_en")]), out


def _fairseq_table(out):
    """bench_fairseq.sh's table -> {model: [train tok/s, wpb, gen tok/s, gen sent/s]}."""
    return {m.group(1): [float(v) for v in m.groups()[1:]] for m in re.finditer(
        r"^(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)}


def _expected_ratios(table, pairs):
    """The ratio rows that the table's own figures give for these (model, reference)."""
    return {(a, b): (f"{table[a][0] / table[b][0]:.2f}x", f"{table[a][2] / table[b][2]:.2f}x")
            for a, b in pairs}


def _ratio_rows(out):
    """bench_fairseq.sh's ratio rows -> {(model, reference): (train, gen)}."""
    block = out.split("\nratios: ", 1)[1].splitlines()[3:]
    rows = {}
    for line in block:
        m = re.match(r"  (\S+) +(\S+) +([\d.]+x|-) +([\d.]+x|-)$", line)
        if not m:
            break
        rows[m.group(1), m.group(2)] = m.group(3, 4)
    return rows


def test_bench_fairseq_variant_backends(tmp_path):
    """``--backends "auto auto+trainstep+attention+graphs"``: each group model twice, the
    second run with GRNN_TRITON_TRAIN_STEP=1, GRNN_TRITON_ATTENTION=1 and
    GRNN_DECODE_GRAPHS=1 in its environment (said on its line), both in the table; an
    unknown variant is refused before anything runs."""
    variant = "auto+trainstep+attention+graphs"
    out = _run(["bash", "scripts/bench_fairseq.sh", "--quick", "--models", "rnnsearch",
                "--backends", f"auto {variant}", "--updates", "2",
                "--gen-length", "3", "--workdir", str(tmp_path)])
    assert "-- rnnsearch.auto: training 2 updates (GRNN_BACKEND=auto)" in out
    assert (f"-- rnnsearch.{variant}: training 2 updates (GRNN_BACKEND=auto "
            "GRNN_TRITON_TRAIN_STEP=1 GRNN_TRITON_ATTENTION=1 GRNN_DECODE_GRAPHS=1)") in out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("rnnsearch.")]
    assert rows == ["rnnsearch.auto", f"rnnsearch.{variant}"], out
    # the variant against the same model on the first backend, and nothing else (no
    # fairseq model ran, and rnnsearch is the K=1 model itself)
    assert _ratio_rows(out) == _expected_ratios(
        _fairseq_table(out), [(f"rnnsearch.{variant}", "rnnsearch.auto")]), out
    for wrong in ("auto+graph", "tritn+graphs"):
        bad = subprocess.run(["bash", "scripts/bench_fairseq.sh", "--backends", f"auto {wrong}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2, bad.stderr
        assert (f"--backends: {wrong}: expected an engine backend "
                "(auto|reference|torch|cpp|triton)") in bad.stderr


def test_bench_fairseq_rounds(tmp_path):
    """--rounds 2: every model trained and generated twice, the second round in reverse
    order; the table has each model's median over the rounds (of two: their mean) and the
    ratios are those of the medians; every round's logs are kept apart."""
    out = _run(["bash", "scripts/bench_fairseq.sh", "--quick", "--models",
                "rnnsearch lstm_wiseman_iwslt_de_en", "--rounds", "2", "--updates", "2",
                "--gen-length", "3", "--workdir", str(tmp_path)])
    order = re.findall(r"^-- (\S+): training", out, re.M)
    assert order == ["rnnsearch.auto.r1", "lstm_wiseman_iwslt_de_en.r1",
                     "lstm_wiseman_iwslt_de_en.r2", "rnnsearch.auto.r2"], out
    table = _fairseq_table(out)
    assert set(table) == {"rnnsearch.auto", "lstm_wiseman_iwslt_de_en"}, out
    for tag, figures in table.items():
        rounds = re.search(rf"^  {re.escape(tag)}: (\S+) / (\S+), (\S+) / (\S+)$", out, re.M)
        train, gen = [float(rounds.group(i)) for i in (1, 3)], [float(rounds.group(i)) for i in (2, 4)]
        assert figures[0] == pytest.approx(sum(train) / 2, abs=0.051), (tag, out)
        assert figures[2] == pytest.approx(sum(gen) / 2, abs=0.0051), (tag, out)
        for r in (1, 2):
            assert "done training" in (tmp_path / f"train.{tag}.r{r}.log").read_text()
            assert (tmp_path / f"generate.{tag}.r{r}.log").exists()
    assert _ratio_rows(out) == _expected_ratios(
        table, [("rnnsearch.auto", "lstm_wiseman_iwslt_de_en")]), out
    bad = subprocess.run(["bash", "scripts/bench_fairseq.sh", "--rounds", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rounds 0: give at least 1 round" in bad.stderr


@pytest.mark.parametrize("option", ["--warmup-updates", "--gen-length", "--rounds"])
def test_bench_fairseq_rejects_a_bad_number(option):
    proc = subprocess.run(["bash", "scripts/bench_fairseq.sh", option, "ten"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{option} ten: expected a whole number" in proc.stderr


@pytest.mark.parametrize("name,value,message", [
    *[("ROUNDS", v, "give a whole number of rounds, at least 1") for v in ("0", "three", "-1")],
    *[("ATTENTION", v, "give values of GRNN_CPU_ATTENTION, 0 or 1")
      for v in ("2", "0,1", "yes", "1 ")],
])
def test_fixed_length_generation_bench_refuses_bad_settings(name, value, message, tmp_path):
    """results/bench_fairseq_cpu_fixed_length.sh with ROUNDS that is not a whole number of
    at least 1, or ATTENTION (values of GRNN_CPU_ATTENTION for its A/B) other than 0s and
    1s separated by spaces: exit 2 with a message naming the value, before any python or
    fairseq runs (an empty folder of checkpoints would otherwise fail later, with another
    message)."""
    proc = subprocess.run(["bash", "results/bench_fairseq_cpu_fixed_length.sh", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **{name: value}))
    assert proc.returncode == 2, proc.stderr
    assert f"{name}={value}: {message}" in proc.stderr
    assert not proc.stdout


def test_bench_layer_decode_graph_cases(monkeypatch):
    """``--graph``: every decode case twice, eagerly and as a graph (recorded at its first
    call, replayed after: the recorder runs it for its warm-up and its recording only);
    refused without CUDA."""
    import torch

    from grnn_fairseq import decode_graphs

    bench = _bench_layer_module()
    recorded = []

    class Recorder:  # a CUDA graph's contract without CUDA: record runs fn twice
        def record(self, fn, inputs):
            fn(*inputs)
            recorded.append(fn(*inputs))
            return recorded[-1], lambda: fn(*inputs)

    monkeypatch.setattr(decode_graphs, "CudaRecorder", Recorder)
    args = bench.parse_args(["--quick", "--device", "cuda", "--graph", "--groups", "1,4",
                             "--rearrangement", "time", "--backend", "auto"])
    cases = bench.make_cases(args, "decode", torch.device("cpu"), torch.float32)
    assert [(c["model"], c["K"], c["backend"]) for c, _ in cases] == [
        ("nn.LSTMCell", "-", "-"), ("nn.LSTMCell", "-", "graph"),
        ("group LSTM", 1, "auto"), ("group LSTM", 1, "auto+graph"),
        ("group LSTM", 4, "auto"), ("group LSTM", 4, "auto+graph")]
    for _, run in cases:
        run(), run(), run()
    assert len(recorded) == 3  # the graph cases, each recorded once
    proc = subprocess.run([sys.executable, "scripts/bench_layer.py", "--quick", "--graph"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and "--graph records CUDA graphs" in proc.stderr


def test_bench_layer_two_pass_backend(monkeypatch):
    """``cpp-2pass`` rows appear beside ``cpp``; its wrapper sets GRNN_CPU_FUSED=0 for the
    call only and restores what was there."""
    out = _run([sys.executable, "scripts/bench_layer.py", "--quick", "--modes", "infer",
                "--groups", "4", "--backend", "cpp-2pass,cpp"])
    backends = {line.split()[5] for line in out.splitlines()
                if line.startswith("infer") and line.split()[1] == "group"}
    assert backends == {"cpp-2pass", "cpp"}, out

    bench = _bench_layer_module()
    seen = []
    run = bench.two_pass(lambda: seen.append(os.environ.get("GRNN_CPU_FUSED")))
    monkeypatch.delenv("GRNN_CPU_FUSED", raising=False)
    run()
    assert seen == ["0"] and "GRNN_CPU_FUSED" not in os.environ
    monkeypatch.setenv("GRNN_CPU_FUSED", "1")
    run()
    assert seen == ["0", "0"] and os.environ["GRNN_CPU_FUSED"] == "1"


def test_bench_layer_vector_unit_backends(monkeypatch):
    """``cpp+generic`` (and every unit up to the CPU's widest) rows appear beside ``cpp``,
    the device line names the unit the fused step uses, the wrapper sets GRNN_CPU_ISA for
    the call only, and a unit that is no unit, or wider than the CPU's, is refused by name."""
    from grnn_fairseq.kernels import cpu_rnn

    widest = cpu_rnn.load().detected_isa()
    units = cpu_rnn.UNITS[:cpu_rnn.UNITS.index(widest) + 1]
    default = "off" if widest == "generic" else widest  # the generic tile: only when named
    out = _run([sys.executable, "scripts/bench_layer.py", "--quick", "--modes", "infer",
                "--groups", "4", "--backend", ",".join(f"cpp+{u}" for u in units) + ",cpp"])
    backends = {line.split()[5] for line in out.splitlines()
                if line.startswith("infer") and line.split()[1] == "group"}
    assert backends == {f"cpp+{u}" for u in units} | {"cpp"}, out
    assert f"C++ fused step: {default};" in out, out

    bench = _bench_layer_module()
    seen = []
    _, wrap = bench.engine_of("cpp+generic")
    run = wrap(lambda: seen.append(os.environ.get("GRNN_CPU_ISA")))
    monkeypatch.delenv("GRNN_CPU_ISA", raising=False)
    run()
    assert seen == ["generic"] and "GRNN_CPU_ISA" not in os.environ
    bad = ["cpp+sse"] + ([] if widest == "avx512" else ["cpp+avx512"])
    for backend in bad:
        proc = subprocess.run([sys.executable, "scripts/bench_layer.py", "--quick", "--backend",
                               backend], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode != 0 and f"--backend {backend}: GRNN_CPU_ISA=" in proc.stderr, \
            proc.stderr


def test_bench_layer_blas_variants(monkeypatch):
    """``NAME-blas`` is NAME with GRNN_CPU_GEMM=blas for the call only, ``NAME-onednn``
    with GRNN_CPU_GEMM=onednn, combined with the other variants (``cpp-2pass-blas`` sets
    both switches); the device line names the library of the large products."""
    bench = _bench_layer_module()
    seen = []
    for backend, want in (("cpp-blas", ("cpp", "blas", None)),
                          ("cpp-onednn", ("cpp", "onednn", None)),
                          ("cpp-2pass-onednn", ("cpp", "onednn", "0")),
                          ("cpp-2pass-blas", ("cpp", "blas", "0")),
                          ("torch-blas", ("torch", "blas", None)),
                          ("cpp", ("cpp", None, None))):
        name, wrap = bench.engine_of(backend)
        monkeypatch.delenv("GRNN_CPU_GEMM", raising=False)
        monkeypatch.delenv("GRNN_CPU_FUSED", raising=False)
        wrap(lambda: seen.append((os.environ.get("GRNN_CPU_GEMM"),
                                  os.environ.get("GRNN_CPU_FUSED"))))()
        assert (name, *seen[-1]) == want, backend
        assert "GRNN_CPU_GEMM" not in os.environ and "GRNN_CPU_FUSED" not in os.environ
    from grnn_fairseq.kernels import onednn

    line = bench.device_name(torch.device("cpu"))
    assert line.endswith(f"; large products: {onednn.library()})"), line
    monkeypatch.setenv("GRNN_CPU_GEMM", "blas")
    assert bench.device_name(torch.device("cpu")).endswith("; large products: blas)")


def test_bench_layer_interrupt_keeps_the_complete_rounds(monkeypatch, capsys):
    """gpu-checks.sh stops a part with SIGINT at its time cap.  Each mode's table is printed
    when the mode ends.  An interrupt during the timing keeps the complete rounds, every
    case alike (the interrupted round is dropped), prints them and exits with 130 without
    starting the next mode; one during the warm-up says that nothing of the mode was
    timed."""
    bench = _bench_layer_module()
    started = []
    fail_in_warmup = []

    def fake_fn():
        if fail_in_warmup:
            raise KeyboardInterrupt

    def fake_cases(args, mode, device, dtype):
        started.append(mode)
        return [(dict(model=name, K=k, rearr="none", backend="fake"), fake_fn)
                for name, k in (("nn.LSTM", "-"), ("group", 4))]

    # the timed calls, 2 cases a round: infer's 3 rounds, then decode's 2 rounds and an
    # interrupt in its third, after case 0 took 5 ms: decode's case 0 must keep [1, 3]
    # (median 2), not [1, 3, 5] (median 3)
    clock = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, None])

    def fake_timer(self, fn):
        t = next(clock)
        if t is None:
            raise KeyboardInterrupt
        return t

    monkeypatch.setattr(bench, "make_cases", fake_cases)
    monkeypatch.setattr(bench.Timer, "__call__", fake_timer)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--modes", "infer,decode,train", "--reps", "3"])
    assert stop.value.code == 130
    out = capsys.readouterr().out
    assert started == ["infer", "decode"]                 # train never started
    medians = {(line.split()[0], line.split()[1]): float(line.split()[-4])
               for line in out.splitlines() if line.split()[:1] in (["infer"], ["decode"])}
    assert medians == {("infer", "nn.LSTM"): 3.0, ("infer", "group"): 4.0,
                       ("decode", "nn.LSTM"): 2.0, ("decode", "group"): 3.0}, out
    assert out.count("x median / x min") == 2
    assert "after 2 of 3 repetitions of mode decode" in out, out

    fail_in_warmup.append(True)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--modes", "infer", "--reps", "3"])
    assert stop.value.code == 130
    assert "during the warm-up of mode infer" in capsys.readouterr().out


def test_bench_layer_triton_variant_backends(monkeypatch):
    """``triton+load`` / ``triton+resident`` / ``triton+perm`` and their combinations run the
    triton engine with VARIANT set for the call only (restored afterwards); a variant of
    another engine, or an unknown one, stops with a message naming the choices (cpp's
    variants, vector units, are named by test_bench_layer_vector_unit_backends)."""
    pytest.importorskip("triton")
    bench = _bench_layer_module()
    from grnn_fairseq.kernels import triton_rnn

    default = {"poll": "atomic", "resident": "0", "perm": "0", "train_step": "0"}
    monkeypatch.setattr(triton_rnn, "VARIANT", dict(default))
    seen = []
    for backend, change in (("triton+load", {"poll": "load"}),
                            ("triton+resident", {"resident": "1"}),
                            ("triton+perm", {"perm": "1"}),
                            ("triton+load+resident", {"poll": "load", "resident": "1"}),
                            ("triton+perm+load", {"poll": "load", "perm": "1"}),
                            ("triton+trainstep", {"train_step": "1"})):
        engine, wrap = bench.engine_of(backend)
        assert engine == "triton"
        wrap(lambda: seen.append(dict(triton_rnn.VARIANT)))()
        assert seen[-1] == dict(default, **change) and triton_rnn.VARIANT == default
    for bad in ("torch+load", "triton+fast"):
        with pytest.raises(SystemExit, match=r"variants exist for triton \(triton\+load\|"):
            bench.engine_of(bad)
    with pytest.raises(SystemExit, match="--backend cpp\\+load: GRNN_CPU_ISA='load' is not one"):
        bench.engine_of("cpp+load")  # cpp's variants are vector units


def test_kernel_resources_reports_every_variant():
    """scripts/kernel_resources.py compiles the LSTM scans for sm_90 without a GPU and prints
    registers, spills and shared memory per kernel and variant; the resident forward uses
    more shared memory than the default one (its weight slices); bad groups are refused."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "scripts/kernel_resources.py", "--groups", "4,16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(env, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0 and "cuobjdump is not at" in proc.stderr:
        pytest.skip("Triton's CUDA toolchain is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(forward|backward)\s+(\d+)\s+(\d+)\s+(\w+)\s+(\d+)\s+(\d+)\s+(\d+)$", line)
        if m:
            rows[m.group(1), int(m.group(2)), m.group(4)] = [int(v) for v in m.groups()[4:]]
    assert set(rows) == {(kernel, k, v) for kernel in ("forward", "backward") for k in (4, 16)
                         for v in ("default", "load", "resident", "perm")
                         if not (kernel == "backward" and v == "resident")}, proc.stdout
    assert all(0 < regs <= 255 for regs, _, _ in rows.values())
    assert rows["forward", 4, "resident"][2] > rows["forward", 4, "default"][2]
    # each variant is the default with its one change: the permuted columns change only
    # index arithmetic, so nothing of the resident variant's shared memory may leak into it
    assert rows["forward", 4, "perm"][2] == rows["forward", 4, "default"][2]
    bad = subprocess.run([sys.executable, "scripts/kernel_resources.py", "--groups", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must divide --width 1024" in bad.stderr


def _fake_gpu_python(tmp_path):
    """A stand-in for the GPU machine's python3: it says a GPU is there, records every other
    call, and checks each bench_layer.py and bench_attention.py command line with the
    script's own parser (and backend names), so a misspelled option fails here, not in a
    lease."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python3"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then echo "Fake GPU | torch 0"; exit 0; fi
printf '%s\\n' "$*" >> {calls}
if [ "$1" = scripts/bench_layer.py ]; then
  shift
  exec {sys.executable} -c '
import sys
sys.path.insert(0, "scripts")
import bench_layer
args = bench_layer.parse_args(sys.argv[1:])
assert args.device == "cuda", args.device
assert set(args.modes) <= set(bench_layer.MODES), args.modes
for backend in args.backend:
    bench_layer.engine_of(backend)
' "$@"
fi
if [ "$1" = scripts/bench_attention.py ]; then
  shift
  exec {sys.executable} -c '
import sys
sys.path.insert(0, "scripts")
import bench_attention
args = bench_attention.parse_args(sys.argv[1:])
assert args.device == "cuda" and not args.quick, args
' "$@"
fi
""")
    fake.chmod(0o755)
    return fake, calls


def test_gpu_checks_first_runs_its_parts_in_order_within_its_deadline(tmp_path):
    """scripts/gpu-checks.sh first (one call of a 15-minute lease): the kernel tests that need
    a GPU, then the variants, decode, training steps, attention, GRU and RNN timings, then
    the fairseq half-precision tests and the other kernel tests, each logged to $OUT with
    its time cap; with too little time left a part is not started and is listed, and the
    stage fails.  The two parts of the kernel tests select, between them, every test of
    the file, each once."""
    fake, calls = _fake_gpu_python(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), GPU_CHECKS_SECONDS="400")
    proc = subprocess.run(["bash", "scripts/gpu-checks.sh", "first"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = calls.read_text().splitlines()
    assert len(ran) == 10, ran
    kernel_tests = "tests/test_triton_engine.py"
    assert ran[0].startswith("-m pytest") and ran[0].endswith(kernel_tests)
    assert ran[1].startswith("-m pytest") and ran[1].endswith("tests/test_decode_graphs.py")
    del ran[1]
    assert "--backend triton,triton+load,triton+resident,triton+load+resident,triton+perm" \
        in ran[1]
    assert "--modes decode --graph" in ran[2]
    assert "--modes steps" in ran[3] and "--backend triton,triton+trainstep" in ran[3]
    assert ran[4] == "scripts/bench_attention.py --device cuda"
    assert "--cell gru" in ran[5] and "--cell rnn" in ran[6]
    assert ran[7].startswith("-m pytest") and ran[7].endswith("tests/test_gpu_training.py")
    assert ran[8].startswith("-m pytest") and ran[8].endswith(kernel_tests)
    logs = sorted(p.name for p in out.iterdir())
    assert logs == sorted(["triton_tests_gpu.txt", "decode_graphs_tests.txt",
                           "bench_layer_cuda_variants.txt",
                           "bench_layer_cuda_decode.txt", "bench_layer_cuda_steps.txt",
                           "bench_attention_cuda.txt", "bench_layer_cuda_gru.txt",
                           "bench_layer_cuda_rnn.txt",
                           "gpu_training_tests.txt", "triton_tests_rest.txt"])
    first = (out / "triton_tests_gpu.txt").read_text()
    assert first.startswith("device: Fake GPU") and "stopped after 150s" in first
    # the deadline caps the last parts (cap 600 s; 400 s in all, less what the others took)
    last = re.search(r"stopped after (\d+)s", (out / "gpu_training_tests.txt").read_text())
    assert last and 300 < int(last.group(1)) <= 400, last

    def selected(call=None):   # the test ids that a call's -k selects (all without a call)
        expr = ["-k", re.search(r" -k (.*) " + re.escape(kernel_tests), call).group(1)] \
            if call else []
        proc = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q",
                               "--collect-only", *expr, kernel_tests], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        return [line for line in proc.stdout.splitlines() if "::" in line]

    gpu, rest, everything = selected(ran[0]), selected(ran[8]), selected()
    assert gpu and rest and not set(gpu) & set(rest)
    assert sorted(gpu + rest) == sorted(everything) and len(everything) > 100
    for name in ("persistent_grid", "permuted", "training_step_matches",
                 "training_step_half", "rnnsearch_trains_with", "fused_attention"):
        assert any(name in t for t in gpu), name

    calls.unlink()
    shutil.rmtree(out)
    env["GPU_CHECKS_SECONDS"] = "20"
    proc = subprocess.run(["bash", "scripts/gpu-checks.sh", "first"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and not calls.exists()
    skipped = (out / "first_skipped.txt").read_text().splitlines()
    assert len(skipped) == 10 and "triton_tests_gpu: not run" in skipped[0], skipped


def test_gpu_checks_refuses_without_a_gpu_and_lists_its_stages():
    env = dict(os.environ, PYTHON=sys.executable)
    usage = subprocess.run(["bash", "scripts/gpu-checks.sh", "nonsense"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2
    for stage in ("kernels", "training", "layer", "variants", "wmt", "iwslt", "trainstep",
                  "all", "first"):
        assert f"gpu-checks.sh {stage} " in usage.stdout, stage
    assert "set -uo" not in usage.stdout  # the header only
    bad = subprocess.run(["bash", "scripts/gpu-checks.sh", "first"], cwd=ROOT, capture_output=True,
                         env=dict(env, GPU_CHECKS_SECONDS="5m"), text=True, timeout=60)
    assert bad.returncode == 2 and "GPU_CHECKS_SECONDS=5m is not a whole number" in bad.stderr
    try:
        import torch
        if torch.cuda.is_available():
            return
    except ImportError:
        pass
    proc = subprocess.run(["bash", "scripts/gpu-checks.sh", "first"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "torch sees no CUDA GPU" in proc.stderr
