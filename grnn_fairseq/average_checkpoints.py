"""Average the parameters of several fairseq checkpoints into one.

::

    grnn-average-checkpoints --inputs ck/checkpoint3.pt ck/checkpoint4.pt --output avg.pt
    grnn-average-checkpoints --inputs ck/ --num-epoch-checkpoints 5 --output avg.pt
    grnn-average-checkpoints --inputs ck/ --num-update-checkpoints 5 --output avg.pt

Floating-point tensors of ``model`` are averaged (accumulated in float64, stored in the
first checkpoint's dtype); all other entries (``cfg``, ``args``, non-float buffers, ...)
are those of the first checkpoint (with ``--num-*-checkpoints``, the newest one, as in
fairseq's ``scripts/average_checkpoints.py``).  Checkpoints are loaded with ``weights_only=True``
(classes allowed by :mod:`grnn_fairseq.compat`) and the output is written atomically.
"""
import argparse
import os
import re
import sys
import tempfile

import torch

from grnn_fairseq import compat  # noqa: F401  (allow-list for weights_only loading)

__all__ = ["CheckpointMismatchError", "average_checkpoints", "last_checkpoints", "main"]

_EPOCH_RE = re.compile(r"^checkpoint(\d+)\.pt$")
_UPDATE_RE = re.compile(r"^checkpoint_\d+_(\d+)\.pt$")


class CheckpointMismatchError(ValueError):
    """The checkpoints do not hold the same parameters."""


def last_checkpoints(directory, n, by="epoch"):
    """Paths of the ``n`` highest-numbered epoch (``checkpointE.pt``) or update
    (``checkpoint_E_U.pt``) checkpoints in ``directory``, oldest first."""
    pattern = _EPOCH_RE if by == "epoch" else _UPDATE_RE
    found = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    if len(found) < n:
        kind = "checkpointN.pt" if by == "epoch" else "checkpoint_E_U.pt"
        raise FileNotFoundError(
            f"asked for the last {n} {by} checkpoints but {directory} has {len(found)} ({kind})"
        )
    found.sort()
    return [path for _, path in found[-n:]]


def _load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or corrupt file: say which file, briefly
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused is not None:  # a class outside the allow-list
            raise RuntimeError(f"cannot load {path} with weights_only=True: {refused}") from err
        # not a checkpoint at all, or a damaged one: torch's own words, without its advice
        # to load with weights_only=False
        after = [lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler" in line]
        why = (after or lines or [""])[0].split(". ")[0]
        raise RuntimeError(f"cannot load {path}: it is not a torch checkpoint, or it is "
                           f"truncated ({type(err).__name__}: {why}); pass the checkpoint*.pt "
                           f"files that fairseq-train wrote") from err


def _shape(value):
    return tuple(value.shape) if torch.is_tensor(value) else type(value).__name__


def _is_record(key):
    """A recurrent stack's record of its rearrangement (``RecurrentStack.shuffles``), which
    checkpoints saved before 2026-11-24 lack: one run resumed across that change has both."""
    return key == "shuffles" or key.endswith(".shuffles")


def _check_same(first_path, first, path, model):
    missing = sorted(k for k in set(first) - set(model) if not _is_record(k))
    extra = sorted(k for k in set(model) - set(first) if not _is_record(k))
    if missing or extra:
        raise CheckpointMismatchError(
            f"{path} and {first_path} have different parameters: "
            f"{len(missing)} missing in {path} {missing[:5]}, "
            f"{len(extra)} not in {first_path} {extra[:5]}"
        )
    for key, value in first.items():
        if key not in model:  # a record (checked above)
            continue
        other = model[key]
        if torch.is_tensor(value) != torch.is_tensor(other) or (
            torch.is_tensor(value) and value.shape != other.shape
        ):
            raise CheckpointMismatchError(
                f"'{key}' has shape {_shape(value)} in {first_path} "
                f"but {_shape(other)} in {path}"
            )


# model options that change what the weights mean without changing their names or shapes
# (--rearrangement permutes units between groups; tying makes one tensor of several names);
# the others (cell, groups, sharing rate, sizes) are caught by the shape check
STRUCTURE_OPTIONS = ("rearrangement", "share_decoder_input_output_embed", "share_all_embeddings")


def _model_options(state):
    cfg = state.get("cfg")
    model = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
    if model is None:
        model = state.get("args")  # checkpoints older than fairseq's dataclass configs
    if model is None:
        return {}
    get = model.get if isinstance(model, dict) else (lambda name: getattr(model, name, None))
    return {name: get(name) for name in STRUCTURE_OPTIONS if get(name) is not None}


def _check_same_options(first_path, first, path, other):
    for name in sorted(set(first) & set(other)):
        if first[name] != other[name]:
            raise CheckpointMismatchError(
                f"{path} was trained with --{name.replace('_', '-')}={other[name]} but "
                f"{first_path} with {first[name]}: the same parameters mean different things"
            )


def average_checkpoints(paths):
    """The first checkpoint's state with ``model`` replaced by the mean of all of them."""
    paths = list(paths)
    if not paths:
        raise ValueError("no checkpoints to average")
    first_path, state = paths[0], _load(paths[0])
    if "model" not in state:
        raise CheckpointMismatchError(f"{first_path} has no 'model' entry")
    first = state["model"]
    first_options = _model_options(state)
    sums = {
        k: v.to(torch.float64).clone()
        for k, v in first.items()
        if torch.is_tensor(v) and v.is_floating_point()
    }
    for path in paths[1:]:
        other = _load(path)
        if "model" not in other:
            raise CheckpointMismatchError(f"{path} has no 'model' entry")
        model = other["model"]
        _check_same(first_path, first, path, model)
        _check_same_options(first_path, first_options, path, _model_options(other))
        for key in [k for k in sums if _is_record(k) and k not in model]:
            del sums[key], first[key]  # averaged with an older checkpoint: kept by none
        for key in sums:
            if not model[key].is_floating_point():
                raise CheckpointMismatchError(
                    f"'{key}' is {first[key].dtype} in {first_path} "
                    f"but {model[key].dtype} in {path}"
                )
            sums[key] += model[key].to(torch.float64)
        del other, model
    averaged = type(first)()  # keeps an OrderedDict an OrderedDict
    for key, value in first.items():
        averaged[key] = (sums[key] / len(paths)).to(value.dtype) if key in sums else value
    state["model"] = averaged
    return state


def _save_atomic(state, output):
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(output) + ".", suffix=".tmp",
                               dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have made
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="grnn-average-checkpoints",
        description="Average the model parameters of fairseq checkpoints.",
    )
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="checkpoint files, or one directory with --num-*-checkpoints")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-epoch-checkpoints", type=int, metavar="N",
                       help="average the last N checkpointE.pt of the --inputs directory")
    group.add_argument("--num-update-checkpoints", type=int, metavar="N",
                       help="average the last N checkpoint_E_U.pt of the --inputs directory")
    parser.add_argument("--output", required=True, help="where to write the average")
    args = parser.parse_args(argv)
    if os.path.isdir(args.output):
        parser.error(f"--output {args.output} is a directory: give the file to write, e.g. "
                     f"{os.path.join(args.output, 'averaged.pt')}")

    by = "epoch" if args.num_epoch_checkpoints is not None else "update"
    n = args.num_epoch_checkpoints if by == "epoch" else args.num_update_checkpoints
    if n is not None:
        if n < 1:
            parser.error("--num-*-checkpoints must be >= 1")
        if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
            parser.error("--num-*-checkpoints takes exactly one directory as --inputs")
        try:
            # newest first, as fairseq's scripts/average_checkpoints.py: the output keeps the
            # newest checkpoint's cfg, optimizer state and training position (epoch, updates)
            paths = last_checkpoints(args.inputs[0], n, by)[::-1]
        except FileNotFoundError as err:
            parser.error(str(err))
    else:
        paths = args.inputs
        for path in paths:
            if os.path.isdir(path):
                parser.error(f"{path} is a directory: add --num-epoch-checkpoints or "
                             "--num-update-checkpoints")
            if not os.path.isfile(path):
                parser.error(f"no such file: {path}")

    try:
        state = average_checkpoints(paths)
    except (CheckpointMismatchError, RuntimeError) as err:
        print(f"grnn-average-checkpoints: error: {err}", file=sys.stderr)
        return 1
    _save_atomic(state, args.output)
    print(f"averaged {len(paths)} checkpoints ({', '.join(paths)}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
