"""grnn_fairseq.cpu_memory: with the plugin imported on a CPU-only machine, glibc serves a
large tensor from its heap and keeps it after ``free``; ``$GRNN_KEEP_FREED_MEMORY=0``
leaves glibc's defaults (a fresh mmap per large block).  Each case runs in its own
process, since the setting is process-wide and applied once."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fairseq")
import grnn_fairseq  # noqa: E402
from grnn_fairseq import cpu_memory  # noqa: E402

PARENT = os.path.dirname(os.path.dirname(os.path.abspath(grnn_fairseq.__file__)))
needs_glibc = pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc only")

# glibc's own account of the process's memory (mallinfo2, glibc >= 2.33): hblks = blocks
# served by mmap, uordblks = heap bytes in use, arena = bytes of the heap.  Measured around
# a 128 MB block of malloc and a 64 MB tensor.
PROBE = r"""
import ctypes, json, sys
import torch
import grnn_fairseq
from grnn_fairseq import cpu_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
# Trimming first, on a layout nothing else disturbs: a block larger than any the process
# has freed comes from the top of the heap and, freed, rejoins it, which glibc's default
# trims at once.  (A torch tensor's small objects may sit above its data and keep it from
# the top, so the tensor below checks only where its data comes from.)
p = libc.malloc(128 << 20)
top = libc.mallinfo2()
libc.free(p)
after = libc.mallinfo2()
before = libc.mallinfo2()
x = torch.ones(16 << 20)  # 64 MB, over any mmap threshold glibc would choose
during = libc.mallinfo2()
del x
print(json.dumps({"applied": cpu_memory.apply(),
                  "mmapped_blocks": during.hblks - before.hblks,
                  "heap_in_use_growth": during.uordblks - before.uordblks,
                  "heap_trimmed": top.arena - after.arena}))
"""


def _probe(value):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PARENT, env.get("PYTHONPATH")) if p)
    env.pop(cpu_memory.ENV, None)
    if value is not None:
        env[cpu_memory.ENV] = value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)


@needs_glibc
@pytest.mark.skipif(torch.cuda.is_available(), reason="'auto' is off where CUDA is available")
@pytest.mark.parametrize("value", [None, "auto", "1"])
def test_plugin_keeps_large_blocks_on_the_heap(value):
    proc = _probe(value)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["applied"] is True
    assert got["mmapped_blocks"] == 0, got
    assert got["heap_in_use_growth"] >= 64 << 20, got
    assert got["heap_trimmed"] == 0, got  # kept after free


@needs_glibc
def test_opt_out_leaves_glibc_defaults():
    proc = _probe("0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["applied"] is False
    assert got["mmapped_blocks"] == 1, got  # glibc's default: its own mmap
    assert got["heap_in_use_growth"] < 64 << 20, got


def test_bad_value_names_the_variable_and_the_choices():
    proc = _probe("yes")
    assert proc.returncode != 0
    assert "GRNN_KEEP_FREED_MEMORY='yes'" in proc.stderr
    assert "'0' never" in proc.stderr
    with pytest.raises(ValueError, match="is not one of auto, 1, 0"):
        cpu_memory.wanted("maybe")


def test_auto_follows_cuda_availability():
    assert cpu_memory.wanted("auto") is (not torch.cuda.is_available())
    assert cpu_memory.wanted(" AUTO ") is (not torch.cuda.is_available())
    assert cpu_memory.wanted("1") is True
    assert cpu_memory.wanted("0") is False
