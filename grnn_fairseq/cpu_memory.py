"""Keep freed memory in the process on CPU-only machines (glibc malloc settings).

A CPU training step of a translation model allocates several tensors of
[target tokens, vocabulary]: the logits, the log-probabilities and their gradients.  At
1,000 tokens and 8k types each is 32 MB.  glibc serves every allocation above its mmap
threshold (at most 32 MB, however it adapts) with a fresh ``mmap`` and gives it back to
the kernel on ``free``.  So each of those tensors is page-faulted and zeroed anew at every
step, a cost that grows with the batch and the vocabulary and helps nothing.

:func:`apply` (run when the plugin is imported) tells glibc, through ``mallopt``, to serve
large blocks from its heap too (``M_MMAP_MAX = 0``) and not to return freed heap memory to
the kernel (``M_TRIM_THRESHOLD = -1``, "disables trimming completely" in ``man mallopt``):
the next step reuses the same pages.
``results/cpu_malloc_ab.txt`` measures it side by side: fairseq training steps 1.12-1.32x
faster at 4,000 tokens per batch (1.03-1.05x at 1,000), for 12-16% more peak memory, which
the process then keeps until it exits.

``$GRNN_KEEP_FREED_MEMORY``:
  ``auto`` (default)  on where torch sees no CUDA device (the GPU keeps its tensors in
                      torch's own caching allocator, so a GPU machine is left as it is);
  ``1``               on, also on a GPU machine (e.g. for ``--cpu`` runs there);
  ``0``               off: glibc's defaults.
Anything other than glibc (macOS, musl) is left as it is.
"""
import ctypes
import os

import torch

from .errors import ConfigError

ENV = "GRNN_KEEP_FREED_MEMORY"
CHOICES = ("auto", "1", "0")
M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_MAX = -4

_applied = None  # None: not yet decided; then True / False


def _glibc():
    """The process's C library if it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def wanted(value=None):
    """Whether the setting applies for ``value`` of ``$GRNN_KEEP_FREED_MEMORY`` (None: read
    the environment).  Raises ValueError for a value that is not one of :data:`CHOICES`."""
    value = (os.environ.get(ENV, "auto") if value is None else value).strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigError(f"${ENV}={value!r} is not one of {', '.join(CHOICES)}: 'auto' (the "
                          "default) keeps freed memory on machines without a CUDA device, "
                          "'1' always, '0' never")
    if value == "auto":
        return not torch.cuda.is_available()
    return value == "1"


def apply():
    """Apply the setting once per process; returns whether glibc now keeps freed memory."""
    global _applied
    if _applied is None:
        libc = _glibc() if wanted() else None
        # mallopt returns 1 on success
        _applied = (libc is not None and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
                    and libc.mallopt(M_MMAP_MAX, 0) == 1)
    return _applied
