"""Loader of the fused CPU loops of the LSTM, GRU and Elman RNN (``rnn_cpu.cpp``, backend
``cpp`` of the engine), of RNNSearch's fused attention on the CPU (``attention_cpu.cpp``,
:mod:`grnn_fairseq.kernels.cpu_attention`) and of the models' dropout on the CPU
(``dropout_cpu.cpp``, :mod:`grnn_fairseq.dropout`): one library.

The C++ sources ship with the package and are compiled just in time, at first use (never
at import), by :func:`torch.utils.cpp_extension.load`: it needs a C++ compiler and
``ninja``.  The build lands in torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) under a name that hashes the source, the flags and the
torch version, so a changed source or torch gets its own build; torch's loader holds a
file lock while it builds, so processes starting together (multi-process training) build
once and the others wait and load the result.  The build runs the ``ninja`` of this
Python environment (the ``ninja`` dependency, beside the interpreter's scripts) ahead of
any other on $PATH: two ninja versions read each other's build log as changed commands,
so a machine with its own ninja rebuilt the library (about 40 s) every time a process ran
with the environment's bin folder on $PATH and the next without it (an activated venv,
then ``.venv/bin/python``; six times in one run of the tests).

In fp32 over at least 4 steps, on a CPU with AVX2 and FMA or with AVX-512, the forward pass
takes a fused step (the recurrent product of each block of units accumulated in registers,
the cell run on it at once), for every cell, where padding a group's last block adds at
most 1/8 to the product (blocks of 16 units with AVX-512, 8 with AVX2: widths 16, 32, ...,
100, 250, ...).  The register tile is the vector unit's (:func:`fused_step_unit`);
``$GRNN_CPU_ISA=generic|avx2|avx512`` forces a narrower one (the generic 4-lane tile runs
only so), and ``$GRNN_CPU_FUSED=0`` switches to the two-pass step (one BLAS product per
step, then the pointwise pass), for A/B measurements.  The backward's product of each step
(dG_t W_hh per group) runs in the same tile where the unit's lanes divide the group width,
and as a BLAS call otherwise or with ``$GRNN_CPU_FUSED=0``.

The library keeps its large per-call buffers (tens of MB) in a small pool instead of
returning them to the OS after each call; ``$GRNN_CPU_POOL_MB`` (default 1024) bounds the
memory the pool keeps while unused, 0 disables it.
"""
import contextlib
import hashlib
import os
import shutil
import sys
import sysconfig
import time
import warnings

import torch

from ..errors import ConfigError, switch

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_HERE, "rnn_cpu.cpp")
# compiled into the same library (and the header they include)
OTHER_SOURCES = tuple(os.path.join(_HERE, f) for f in ("attention_cpu.cpp", "dropout_cpu.cpp"))
HEADERS = (os.path.join(_HERE, "cpu_math.h"),)
CELL_IDS = {"lstm": 0, "gru": 1, "rnn": 2}  # the ``cell`` argument of the ops
_LINUX = sys.platform.startswith("linux")
# -fno-trapping-math lets the compiler vectorise the clamps of exp (results unchanged);
# OpenMP drives at::parallel_for (the library links the libgomp torch has already loaded)
CFLAGS = ["-O3", "-fno-trapping-math"] + (["-fopenmp"] if _LINUX else [])
LDFLAGS = ["-fopenmp"] if _LINUX else []
FIX = ("the backend 'cpp' compiles a C++ extension at first use: it needs a C++ compiler "
       "(e.g. apt-get install g++) and ninja (pip install ninja); or use "
       "backend='torch' / GRNN_BACKEND=torch")

# torch's loader holds a lock file while one process builds; a process killed mid-build
# leaves it behind and every later one would wait forever.  A build takes well under a
# minute, so a lock this old is stale.
STALE_LOCK_SECONDS = 600

_ops = None
_error = None
_warned = False


def _remove_stale_lock(name):
    try:
        from torch.utils.cpp_extension import _get_build_directory  # torch's own build path
        lock = os.path.join(_get_build_directory(name, False), "lock")
        age = time.time() - os.path.getmtime(lock)
    except Exception:  # no lock (the usual case), or a torch without that helper
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(f"removing the stale build lock {lock} ({age / 60:.0f} minutes old; "
                      "left by a process killed while it compiled)", RuntimeWarning)
        try:
            os.remove(lock)
        except OSError:
            pass


def _name():
    """The build's name: a hash of the sources and the header, the flags, torch's version,
    the main source's path and the ninja that builds it.  The path keeps two checkouts (or
    an installed copy and a checkout) in separate build folders: torch's build file names
    the source by path, so sharing one folder would rebuild it every time the other copy
    runs, and make its processes wait; likewise two ninja versions (see :func:`_ninja`)."""
    key = b"".join(_read(path) for path in (SOURCE,) + OTHER_SOURCES + HEADERS)
    key += repr((CFLAGS, LDFLAGS, torch.__version__, SOURCE, _ninja())).encode()
    return "grnn_rnn_cpu_" + hashlib.sha1(key).hexdigest()[:12]


def _ninja():
    """The ninja a build runs: this Python environment's own (the ``ninja`` package's,
    in the interpreter's scripts folder) where it has one, else the first on $PATH (None
    without any).  Each ninja version takes the build log another wrote for a changed
    command and rebuilds everything."""
    scripts = sysconfig.get_path("scripts")
    return (shutil.which("ninja", path=scripts) if scripts else None) or shutil.which("ninja")


@contextlib.contextmanager
def _ninja_first():
    """$PATH with :func:`_ninja`'s folder first while torch builds (it runs "ninja" by
    name), restored after."""
    ninja, before = _ninja(), os.environ.get("PATH")
    if ninja:
        os.environ["PATH"] = os.pathsep.join([os.path.dirname(ninja)] + ([before] if before
                                                                           else []))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def load():
    """The compiled ops (``torch.ops.grnn_rnn_cpu``), built on the first call.  Raises
    RuntimeError naming the cause and the fix when it cannot be built or loaded (the
    failure is remembered: one attempt per process)."""
    global _ops, _error
    if _ops is not None:
        return _ops
    if _error is not None:
        raise _error
    try:
        missing = [p for p in (SOURCE,) + OTHER_SOURCES + HEADERS if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is missing: this installed copy of grnn_fairseq "
                                    "lacks its C++ source (install from a source checkout, "
                                    "e.g. pip install -e .)")
        from torch.utils.cpp_extension import load as load_extension, verify_ninja_availability

        with _ninja_first():
            verify_ninja_availability()
            name = _name()
            _remove_stale_lock(name)
            # copies: torch appends its own flags to extra_ldflags in place, which would
            # change _name() for the rest of the process
            load_extension(name=name, sources=[SOURCE, *OTHER_SOURCES],
                           extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                           is_python_module=False, verbose=False)
        _ops = torch.ops.grnn_rnn_cpu
        # fails here if a registration failed
        _ops.forward, _ops.backward, _ops.attention_forward, _ops.seeded_dropout  # noqa: B018
    except Exception as e:  # no compiler, no ninja, compile or load error
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        errors = [line for line in lines
                  if "error" in line.lower() or "not found" in line or "missing" in line]
        cause = (errors[-1] if errors else lines[-1] if lines else "")[:400]
        _error = RuntimeError(f"the fused CPU recurrence (C++) could not be built or loaded "
                              f"({type(e).__name__}: {cause}); {FIX}")
        _error.__cause__ = e
        raise _error
    return _ops


UNITS = ("generic", "avx2", "avx512")  # the fused step's vector units, narrowest first
_widest = None


def check_switches(environ=os.environ):
    """$GRNN_CPU_FUSED (0 | 1) and $GRNN_CPU_ISA (a unit this CPU has), which the library
    reads at every call, checked here first: a bad value raises ConfigError naming the
    fix (the library's own check would raise from inside the op)."""
    fused = environ.get("GRNN_CPU_FUSED", "")
    if fused:
        switch("GRNN_CPU_FUSED", fused)
    unit = environ.get("GRNN_CPU_ISA", "")
    if unit:
        global _widest
        if unit not in UNITS:
            raise ConfigError(f"GRNN_CPU_ISA={unit!r} is not one of {', '.join(UNITS)} (the "
                              "vector unit of the C++ fused step); unset it to use the widest "
                              "this CPU has")
        if _widest is None:
            _widest = load().detected_isa()
        if UNITS.index(unit) > UNITS.index(_widest):
            raise ConfigError(f"GRNN_CPU_ISA={unit}: this CPU's widest vector unit is "
                              f"{_widest}; set one of "
                              f"{', '.join(UNITS[:UNITS.index(_widest) + 1])}, or unset it")


def fused_step_unit():
    """What the fused fp32 step runs on here: "avx512", "avx2" or "generic" (the vector
    unit whose tile it uses, as $GRNN_CPU_ISA leaves it), "off" (the two-pass step:
    $GRNN_CPU_FUSED=0, or a CPU without AVX2 + FMA where $GRNN_CPU_ISA does not name
    generic), or None where the library does not load.  Benchmarks print it: the same
    model runs different code on an AVX2 and an AVX-512 machine."""
    try:
        unit = load().fused_isa()
    except RuntimeError:
        return None
    if os.environ.get("GRNN_CPU_FUSED") == "0" or (unit == "generic"
                                                   and not os.environ.get("GRNN_CPU_ISA")):
        return "off"
    return unit


def available():
    """True when the extension loads (building it if needed); a failure warns once and
    returns False, so that ``auto`` falls back to the ``torch`` backend (the GRU and RNN:
    ``reference``)."""
    global _warned
    try:
        load()
    except RuntimeError as e:
        if not _warned:
            _warned = True
            warnings.warn(f"{e}.  Falling back to backend 'torch' (the LSTM) or 'reference' "
                          "(the GRU and RNN).", RuntimeWarning, stacklevel=3)
        return False
    return True
