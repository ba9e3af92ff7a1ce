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
once and the others wait and load the result.

In fp32 over at least 4 steps, where padding a group's last block of 16 units adds at most
1/8 to the product (widths 16, 32, ..., 100, 250, ...), the forward pass takes a fused step
(the recurrent product of each 16-unit block accumulated in registers, the cell run on it
at once), for every cell; ``$GRNN_CPU_FUSED=0`` switches to the two-pass step (one BLAS
product per step, then the pointwise pass), for A/B measurements.

The library keeps its large per-call buffers (tens of MB) in a small pool instead of
returning them to the OS after each call; ``$GRNN_CPU_POOL_MB`` (default 1024) bounds the
memory the pool keeps while unused, 0 disables it.
"""
import hashlib
import os
import sys
import time
import warnings

import torch

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
    """The build's name: a hash of the sources and the header, the flags, torch's version
    and the main source's path.  The path keeps two checkouts (or an installed copy and a
    checkout) in separate build folders: torch's build file names the source by path, so
    sharing one folder would rebuild it every time the other copy runs, and make its
    processes wait."""
    key = b"".join(_read(path) for path in (SOURCE,) + OTHER_SOURCES + HEADERS)
    key += repr((CFLAGS, LDFLAGS, torch.__version__, SOURCE)).encode()
    return "grnn_rnn_cpu_" + hashlib.sha1(key).hexdigest()[:12]


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

        verify_ninja_availability()
        _remove_stale_lock(_name())
        load_extension(name=_name(), sources=[SOURCE, *OTHER_SOURCES], extra_cflags=CFLAGS,
                       extra_ldflags=LDFLAGS, is_python_module=False, verbose=False)
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
