"""The package installs, and fairseq finds it both by --user-dir path and when installed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import argparse, sys
from fairseq import utils
from fairseq.models import ARCH_MODEL_REGISTRY
utils.import_user_module(argparse.Namespace(user_dir=sys.argv[1]))
import grnn_fairseq
cls = ARCH_MODEL_REGISTRY["group_rnnsearch_k4"]
assert cls.__module__.startswith("grnn_fairseq"), cls
print(grnn_fairseq.__file__)
"""


def run_check(user_dir, cwd, env=None):
    return subprocess.run([sys.executable, "-c", CHECK, str(user_dir)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_user_dir_path_from_the_source_tree(tmp_path):
    r = run_check(ROOT / "grnn_fairseq", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()).resolve() == (ROOT / "grnn_fairseq" / "__init__.py").resolve()


def test_installed_copy_works_as_user_dir(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"pip install failed: {r.stderr[-2000:]}")
    installed = target / "grnn_fairseq"
    assert (installed / "models" / "rnnsearch.py").is_file()
    from grnn_fairseq.kernels import cpu_rnn

    # every file the C++ library is built from (the loader's list: 4 files)
    sources = [os.path.basename(p) for p in (cpu_rnn.SOURCE,) + cpu_rnn.OTHER_SOURCES + cpu_rnn.HEADERS]
    assert len(sources) == 4 and "dropout_cpu.cpp" in sources
    for source in sources:
        assert (installed / "kernels" / source).is_file(), source
    env = dict(os.environ, PYTHONPATH=str(target))
    r = run_check(installed, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()).resolve() == (installed / "__init__.py").resolve()


def test_layers_import_without_fairseq():
    """The recurrent layers are plain PyTorch: usable where fairseq is not installed."""
    code = ("import sys; sys.modules['fairseq'] = None\n"
            "import grnn_fairseq, torch\n"
            "assert not grnn_fairseq.HAVE_FAIRSEQ\n"
            "from grnn_fairseq.recurrent import RecurrentStack\n"
            "print(RecurrentStack(8, 8, groups=2)(torch.zeros(3, 1, 8))[0].shape)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([3, 1, 8])" in r.stdout


def test_every_environment_variable_the_package_reads_is_in_the_readme():
    """Each ``"GRNN_..."`` name in the package's code (Python and C++, the variables it
    reads) has a row in the README's table of environment variables, and each row names
    one that the code still reads."""
    import re

    pkg = ROOT / "grnn_fairseq"
    read = set()
    for path in list(pkg.rglob("*.py")) + list(pkg.rglob("*.cpp")):
        read |= set(re.findall(r'"(GRNN_[A-Z_]+)"', path.read_text()))
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Environment variables", 1)[1].split("\n### ", 1)[0]
    rows = set(re.findall(r"^\| `(GRNN_[A-Z_]+)` \|", table, re.M))
    assert read and rows == read, (sorted(read - rows), sorted(rows - read))


def _pins(text):
    """A pip constraints file -> {normalised name: version} (comments and blanks skipped)."""
    import re

    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned with ==: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_requirement_but_torch():
    """scripts/constraints.txt (what setup-env.sh and so CI install) pins each package that
    setup.py requires, its fairseq and test extras included, except torch, which
    TORCH_SPEC chooses; and fairseq-fixed at the version setup.py names."""
    import ast
    import re

    pins = _pins((ROOT / "scripts" / "constraints.txt").read_text())
    setup = (ROOT / "setup.py").read_text()
    call = next(n for n in ast.walk(ast.parse(setup))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    args = {k.arg: ast.literal_eval(k.value) for k in call.keywords
            if k.arg in ("install_requires", "extras_require")}
    required = args["install_requires"] + args["extras_require"]["fairseq"] + \
        args["extras_require"]["test"]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z][\w.-]*", r).group()).lower()
             for r in required}
    assert {"numpy", "sacrebleu", "fairseq-fixed", "pytest", "triton"} <= names, names
    assert names - {"torch"} <= set(pins), sorted(names - {"torch"} - set(pins))
    assert "torch" not in pins
    assert pins["fairseq-fixed"] == re.search(r'"fairseq-fixed==([\d.]+)"', setup).group(1)


def test_environment_has_the_pinned_versions():
    """In an environment that scripts/setup-env.sh built with the pins (CI's), every pinned
    package is installed at its pinned version: the pins are what the tests ran with."""
    import importlib.metadata as md

    recorded = Path(sys.prefix) / ".grnn-constraints"
    if not recorded.exists() or not recorded.read_text().strip():
        pytest.skip("this environment was not built by scripts/setup-env.sh with the pins")
    pins = _pins(recorded.read_text())
    assert pins == _pins((ROOT / "scripts" / "constraints.txt").read_text()), \
        "scripts/constraints.txt changed since this environment was built: rerun setup-env.sh"
    wrong = {name: (version, md.version(name)) for name, version in pins.items()
             if md.version(name) != version}
    assert not wrong, wrong


def test_setup_env_refuses_a_missing_constraints_file(tmp_path):
    env = dict(os.environ, GRNN_VENV=str(tmp_path / "venv"),
               GRNN_CONSTRAINTS=str(tmp_path / "nowhere.txt"))
    r = subprocess.run(["bash", "scripts/setup-env.sh"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nowhere.txt: no such file" in r.stderr, r.stderr
    assert not (tmp_path / "venv").exists()


def test_setup_env_installs_with_the_pins_and_skips_only_when_they_are_installed(tmp_path):
    """setup-env.sh against a stand-in environment whose python logs its arguments: with
    fairseq-fixed both installs get ``-c`` and the pins are recorded; run again, nothing
    runs; with other pins, it installs again; with GRNN_FAIRSEQ=existing nothing is pinned."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    python.chmod(0o755)
    pins_a, pins_b = tmp_path / "a.txt", tmp_path / "b.txt"
    pins_a.write_text("numpy==1.0\n")
    pins_b.write_text("numpy==2.0\n")

    def setup(**extra):
        log.write_text("")
        env = dict(os.environ, GRNN_VENV=str(venv), **extra)
        r = subprocess.run(["bash", "scripts/setup-env.sh"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [line for line in log.read_text().splitlines() if " install " in line]

    installs = setup(GRNN_CONSTRAINTS=str(pins_a))
    assert [line.split()[:5] for line in installs[1:]] == [
        ["-m", "pip", "install", "-q", "-c"]] * 2 and all(str(pins_a) in i for i in installs[1:])
    assert "torch==" in installs[1] and '.[fairseq,test]' in installs[2]
    assert (venv / ".grnn-constraints").read_text() == pins_a.read_text()
    assert setup(GRNN_CONSTRAINTS=str(pins_a)) == []             # done, same pins
    assert len(setup(GRNN_CONSTRAINTS=str(pins_b))) == 3         # other pins: again
    assert (venv / ".grnn-constraints").read_text() == pins_b.read_text()
    (venv / ".grnn-setup-done").unlink()
    installs = setup(GRNN_CONSTRAINTS=str(pins_a), GRNN_FAIRSEQ="existing")
    assert installs and not any(" -c " in i for i in installs) and ".[test]" in installs[-1]
    assert (venv / ".grnn-constraints").read_text() == ""
