"""Compatibility fixes for fairseq 0.12 on the current stack (torch >= 2.6, numpy 2).

Applied once at import (``import grnn_fairseq`` or ``--user-dir``); :func:`apply` is
idempotent.

* **torch >= 2.6** unpickles with ``weights_only=True`` by default.  The safety stays on:
  only the non-tensor classes that fairseq's own checkpoints (and the state it broadcasts
  on a multi-GPU resume) contain are allow-listed, see :data:`SAFE_GLOBALS`.  fairseq
  passes no ``weights_only`` itself; every checkpoint path (train resume, generate,
  interactive, eval-lm, validate, hub) goes through
  ``checkpoint_utils.load_checkpoint_to_cpu`` -> ``torch.load``, and a multi-GPU resume
  additionally through ``distributed.utils._broadcast_object_slow`` -> ``torch.load``;
  the process-wide allow-list covers both.
* **numpy 2** removed ``np.compat`` (fairseq uses ``np.compat.long`` in
  ``TokenBlockDataset`` for ``--sample-break-mode eos`` and in ``LanguagePairDataset``
  for ``--num-batch-buckets``): a minimal ``np.compat`` with ``long = int`` (its numpy 1.x
  value) is added when missing.
* **numpy >= 2.4** dropped ``np.percentile(..., interpolation=)`` (renamed ``method=``),
  which fairseq's ``data_utils.get_buckets`` (``--num-batch-buckets``) still passes: that
  function is replaced by an equivalent one when the old keyword is rejected.
* **fairseq 0.12** ``data_utils.batch_by_size`` drops a last batch whose size is not a
  multiple of ``--required-batch-size-multiple`` (default 8), so generate, validate and
  eval-lm silently skip up to a whole batch of the test set (facebookresearch/fairseq#5036;
  6 test sentences give *no* output).  The dropped tail is put back.
* **fairseq 0.12** passes ``device_ids`` to torch's DDP even with ``--cpu``; dropped for CPU
  modules so multi-process CPU training (gloo) works with the default ``pytorch_ddp``.
* **fairseq 0.12.3** diverse beam search (``--diverse-beam-groups``) indexes its per-sentence
  overlap counts, which have one row per sentence of the batch, by the sentences' *dataset
  ids*, which the generator passes; every batch but one whose ids are 0..B-1 stops with an
  IndexError (for every model, fairseq's own included).  The ids are mapped back to the
  sentences' rows in the batch.
* **fairseq 0.12** ``--no-repeat-ngram-size`` blocks nothing unless fairseq's CUDA
  extension is built: the Python path (``NGramRepeatBlock._no_repeat_ngram``) takes the last
  n - 1 tokens of the generator's whole token buffer, which are padding until the last step.
  It is handed the tokens generated so far.
* **fairseq 0.12** never calls ``torch.distributed.destroy_process_group``.  With gloo (CPU
  training on several processes) a rank can then die at interpreter exit with SIGABRT
  ("terminate called without an active exception") after its training finished, when its
  group's worker threads are torn down during finalisation (pytorch/pytorch#190489), so a
  job scheduler sees a failed run.  A gloo default group is destroyed at exit, while the
  interpreter is still alive; first the DDP wrappers that fairseq made let go of the group
  (their reducers held it, so that destroying it did not free it with ``--ddp-backend
  pytorch_ddp``) and a garbage collection frees what fairseq left in reference cycles.
* **fairseq 0.12** ties ``--bf16`` to ``--tpu`` (``options.parse_args_and_arch``), so
  ``fairseq-train --bf16`` on a GPU or the CPU stops in the trainer with "'NoneType' object
  has no attribute 'xla_device'" (facebookresearch/fairseq#4696), although its trainer and
  FP16Optimizer train in bfloat16 on any device.  Where ``torch_xla`` is not installed and
  ``--tpu`` was not given, ``--bf16`` keeps the CUDA device (or the CPU) and trains in
  bfloat16.  ``--tpu`` without ``torch_xla``, and ``fairseq-train --fp16`` without a CUDA
  device (fairseq's FP16Optimizer asks CUDA for its device: "Torch not compiled with CUDA
  enabled"), stop with a message that names the fix.
"""
import argparse
import atexit
import collections
import functools
import gc
import importlib.util
import logging
import os
import sys
import types
import typing
import weakref

import numpy as np
import torch

__all__ = ["SAFE_GLOBALS", "apply", "safe_globals"]

logger = logging.getLogger(__name__)


def _build_safe_globals():
    """``(object, reason)`` pairs, each found in a real fairseq checkpoint or broadcast."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
    entries = [
        # --- checkpoint files written by fairseq-train
        (argparse.Namespace, "cfg['model'] of legacy (add_args) models, e.g. lstm; old 'args'"),
        (core.multiarray._reconstruct, "np.ndarray meters (--eval-bleu _bleu_counts/_totals)"),
        (np.ndarray, "class of those meter arrays"),
        (np.dtype, "dtype of those meter arrays"),
        (type(np.dtype(np.int64)), "numpy 2 pickles int64 dtypes via numpy.dtypes.Int64DType"),
    ]
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.nodes import AnyNode
    except ImportError:  # no fairseq (and so no omegaconf): no broadcast either
        return entries
    entries += [
        # --- multi-GPU resume: rank 0 broadcasts the *loaded* state (cfg is then a
        # DictConfig, tensors are replaced by _TensorPlaceholder) via torch.save/torch.load
        (DictConfig, "broadcast cfg (load_checkpoint_to_cpu turns it into a DictConfig)"),
        (ListConfig, "lists inside that cfg (update_freq, lr, ...)"),
        (ContainerMetadata, "metadata of those containers"),
        (Metadata, "metadata of their value nodes"),
        (AnyNode, "value nodes of an untyped cfg"),
        (typing.Any, "ref_type/key_type/element_type of those nodes"),
        (dict, "object_type of a DictConfig"),
        (list, "object_type of a ListConfig"),
        (int, "key_type of a ListConfig"),
        (collections.defaultdict, "omegaconf's resolver_cache in ContainerMetadata"),
    ]
    try:
        from fairseq.distributed.utils import _TensorPlaceholder
    except ImportError:  # layout of another fairseq fork; nothing to allow
        pass
    else:
        entries.append((_TensorPlaceholder, "stands for each tensor in the broadcast state"))
    return entries


SAFE_GLOBALS = _build_safe_globals()


def safe_globals():
    """The allow-listed objects, without their reasons."""
    return [obj for obj, _ in SAFE_GLOBALS]


def _allow_list_checkpoint_globals():
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 loads without weights_only by default
        return
    known = {id(g) for g in torch.serialization.get_safe_globals() if not isinstance(g, tuple)}
    missing = [obj for obj in safe_globals() if id(obj) not in known]
    if missing:
        add(missing)


def _numpy_compat_long():
    try:
        compat = np.compat
    except AttributeError:  # numpy >= 2.0
        compat = types.ModuleType("numpy.compat", "grnn_fairseq shim: only `long` (= int)")
        np.compat = compat
    if not hasattr(compat, "long"):
        compat.long = int  # its value in numpy 1.x


def _percentile_accepts_interpolation():
    try:
        np.percentile([0.0, 1.0], 50, interpolation="lower")
    except TypeError:
        return False
    return True


def _get_buckets(sizes, num_buckets):
    """``fairseq.data.data_utils.get_buckets`` with numpy's ``method=`` keyword."""
    q = np.linspace(0, 100, num_buckets + 1)
    return np.unique(np.percentile(sizes, q, method="lower")[1:])


def _patch_get_buckets():
    from fairseq.data import data_utils

    original = data_utils.get_buckets
    if original is _get_buckets or _percentile_accepts_interpolation():
        return
    # modules that did `from fairseq.data.data_utils import get_buckets` hold their own name
    for name, module in list(sys.modules.items()):
        if name.startswith("fairseq") and getattr(module, "get_buckets", None) is original:
            module.get_buckets = _get_buckets


def _drops_last_batch(batch_by_size):
    probe = batch_by_size(np.arange(3, dtype=np.int64), lambda i: 1, max_sentences=8,
                          required_batch_size_multiple=8)
    return sum(len(b) for b in probe) < 3


def _keep_last_batch():
    from fairseq.data import data_utils

    original = data_utils.batch_by_size
    if getattr(original, "_grnn_keeps_last_batch", False) or not _drops_last_batch(original):
        return

    @functools.wraps(original)
    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None,
                      max_sentences=None, required_batch_size_multiple=1, fixed_shapes=None):
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        if len(indices) == 0:  # (fairseq raises IndexError)
            return []
        batches = original(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                           required_batch_size_multiple, fixed_shapes)
        if fixed_shapes is not None:  # fixed shapes may leave indices out on purpose
            return batches
        # batches are consecutive chunks of `indices`; the dropped one is the tail
        kept = sum(len(b) for b in batches)
        if kept < len(indices):
            batches = list(batches) + [indices[kept:].astype(np.int64)]
        return batches

    batch_by_size._grnn_keeps_last_batch = True
    data_utils.batch_by_size = batch_by_size


def _ddp_on_cpu():
    """fairseq wraps models in torch DDP with ``device_ids=[device_id]`` even with ``--cpu``,
    which torch rejects for CPU modules; multi-process CPU training (gloo) then cannot use
    the default ``--ddp-backend pytorch_ddp``.  For CPU modules the ids are dropped (GPU
    modules are wrapped exactly as before)."""
    from fairseq.models import distributed_fairseq_model as dfm

    ddp = torch.nn.parallel.DistributedDataParallel
    if dfm.DistributedDataParallel is not ddp:  # already wrapped, or a fork's own class
        return

    def data_parallel(module, device_ids=None, output_device=None, **kwargs):
        if next(module.parameters()).device.type == "cpu":
            device_ids = output_device = None
        wrapped = ddp(module, device_ids=device_ids, output_device=output_device, **kwargs)
        _DDP_MODULES.add(wrapped)   # released at exit (_destroy_gloo_group)
        return wrapped

    dfm.DistributedDataParallel = data_parallel


def _diverse_beam_search_by_row():
    """``DiverseBeamSearch.step`` receives ``original_batch_idxs``: ``sample["id"]`` as the
    generator passes it, narrowed to the unfinished sentences at every step.  Its
    ``group_overlap`` has one row per sentence of the batch at step 0, so it needs each
    sentence's row there: at step 0 the ids are recorded, later ones are mapped to their
    rows.  Where the ids already are rows (0..B-1) nothing changes."""
    from fairseq import search

    cls = getattr(search, "DiverseBeamSearch", None)
    if cls is None or getattr(cls.step, "_grnn_by_row", False):
        return
    original = cls.step

    @functools.wraps(original)
    def step(self, step, lprobs, scores, prev_output_tokens=None, original_batch_idxs=None):
        if original_batch_idxs is not None:
            if step == 0:
                ids = original_batch_idxs.reshape(-1)
                order = ids.argsort()
                self._grnn_sorted_ids, self._grnn_rows = ids[order], order
                original_batch_idxs = torch.arange(ids.numel(), device=ids.device)
            elif getattr(self, "_grnn_rows", None) is not None:
                at = torch.searchsorted(self._grnn_sorted_ids, original_batch_idxs)
                original_batch_idxs = self._grnn_rows[at]
        return original(self, step, lprobs, scores, prev_output_tokens, original_batch_idxs)

    step._grnn_by_row = True
    cls.step = step


def _ngram_block_reads_generated_tokens():
    """``SequenceGenerator`` passes its [rows, max_len + 2] token buffer; at ``step`` only
    columns 0..step (the leading end-of-sentence and the tokens so far) are filled.  The CPU
    path compares the buffer's last n - 1 columns with every earlier (n - 1)-gram, so it never
    saw the hypothesis's own last tokens.  It gets columns 0..step instead; the CUDA
    extension, which reads ``step`` itself, is left as it is."""
    from fairseq import ngram_repeat_block

    cls = ngram_repeat_block.NGramRepeatBlock
    if getattr(cls._no_repeat_ngram, "_grnn_generated", False):
        return
    original = cls._no_repeat_ngram

    @functools.wraps(original)
    def _no_repeat_ngram(self, tokens, lprobs, bsz, beam_size, step):
        return original(self, tokens[:, : step + 1], lprobs, bsz, beam_size, step)

    _no_repeat_ngram._grnn_generated = True
    cls._no_repeat_ngram = _no_repeat_ngram


_DDP_MODULES = weakref.WeakSet()   # the DDP wrappers made through _ddp_on_cpu


def _destroy_gloo_group():
    """At exit: destroy the default process group if it is gloo's, so that its worker
    threads are joined while the interpreter is alive.  A DDP wrapper holds the group (as
    ``process_group``, and through its reducer and logger): these are released first, and
    a garbage collection frees the trainer and wrappers fairseq left in reference cycles,
    so that destroying the group frees it here and not during finalisation.  Other
    backends are left as they are: destroying an NCCL group waits for its pending work,
    which could hang a rank whose peers have died, where exiting without it does not."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"):
        return
    for wrapped in list(_DDP_MODULES):
        for name in ("logger", "reducer", "process_group"):
            if getattr(wrapped, name, None) is not None:
                setattr(wrapped, name, None)
    gc.collect()
    dist.destroy_process_group()


def _xla_available():
    return importlib.util.find_spec("torch_xla") is not None


def _tpu_on_command_line(argv):
    return any(a == "--tpu" or a.startswith(("common.tpu=", "+common.tpu=")) for a in argv)


def _no_tpu(cfg):
    """``tpu`` = False in every section of ``cfg`` that has it: the namespace was copied into
    common, distributed_training (multi-GPU start-up), optimizer (Adam) and a legacy
    model's Namespace (the DDP wrapper)."""
    for key in list(cfg.keys()):
        section = cfg[key]
        if hasattr(section, "keys") and "tpu" in section.keys():
            section.tpu = False
        elif isinstance(section, argparse.Namespace) and hasattr(section, "tpu"):
            section.tpu = False


def check_precision(cfg, training, argv=None, xla=None, cuda=None):
    """Before a fairseq command runs (``distributed_utils.call_main``): ``--bf16`` without
    ``torch_xla`` and without ``--tpu`` given trains on the CUDA device or the CPU (``tpu``
    set back to False in every section, :func:`_no_tpu`); ``--tpu`` without ``torch_xla``,
    and training with ``--fp16`` without a CUDA device, are ConfigErrors naming the fix."""
    from .errors import ConfigError

    common = cfg.common
    argv = sys.argv[1:] if argv is None else argv
    xla = _xla_available() if xla is None else xla
    if common.tpu and not xla:
        if common.bf16 and not _tpu_on_command_line(argv):
            _no_tpu(cfg)  # fairseq set it for --bf16 (fairseq#4696)
            logger.info("--bf16: bfloat16 on %s (fairseq 0.12 ties --bf16 to --tpu; torch_xla "
                        "is not installed)", "the CPU" if common.cpu else "the CUDA device")
        else:
            raise ConfigError("--tpu needs torch_xla, which is not installed; on a GPU or the "
                              "CPU leave --tpu out (--bf16 alone trains in bfloat16 there)")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if training and common.fp16 and not common.tpu and (common.cpu or not cuda):
        raise ConfigError("--fp16 trains on a CUDA GPU only (fairseq's FP16Optimizer keeps its "
                          "fp32 copy on the CUDA device); on the CPU use --bf16, or leave both "
                          "out to train in fp32")


def _is_training(main):
    """Whether ``main`` is fairseq-train's (or fairseq-hydra-train's): by its file, since
    ``python -m fairseq_cli.train`` names its module ``__main__``."""
    code = getattr(main, "__code__", None)
    path = os.path.normpath(code.co_filename) if code is not None else ""
    return path.endswith((os.path.join("fairseq_cli", "train.py"),
                          os.path.join("fairseq_cli", "hydra_train.py")))


def _check_precision_before_main():
    """Run :func:`check_precision` on the configuration of every fairseq command: they all
    start their work through ``distributed_utils.call_main``, which they look up on the
    module at call time (after ``--user-dir`` imported this plugin)."""
    from fairseq.distributed import utils as distributed_utils

    original = distributed_utils.call_main
    if getattr(original, "_grnn_precision", False):
        return

    @functools.wraps(original)
    def call_main(cfg, main, **kwargs):
        if hasattr(cfg, "common"):
            check_precision(cfg, _is_training(main))
        return original(cfg, main, **kwargs)

    call_main._grnn_precision = True
    distributed_utils.call_main = call_main


_APPLIED = False


def apply():
    """Apply all fixes (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _allow_list_checkpoint_globals()
    _numpy_compat_long()
    atexit.register(_destroy_gloo_group)
    try:
        import fairseq.data  # noqa: F401
    except ImportError:  # no fairseq: the allow-list and np.compat are all there is to do
        _APPLIED = True
        return
    _patch_get_buckets()
    _keep_last_batch()
    _ddp_on_cpu()
    _diverse_beam_search_by_row()
    _ngram_block_reads_generated_tokens()
    _check_precision_before_main()
    _APPLIED = True


apply()
