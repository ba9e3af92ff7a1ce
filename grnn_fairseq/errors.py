"""Configuration errors, and how fairseq's commands show them.

The checks of this package that a user's options, data or checkpoints can fail raise a
:class:`ConfigError` (a ``ValueError``) whose message names the problem and the fix.
fairseq's commands print every exception with its traceback: some 30 lines of fairseq's
and torch's frames above that message.  When a ConfigError ends a program, the hook that
importing the plugin installs prints it the way argparse prints a bad option instead,

    fairseq-train: error: --encoder-groups=3: groups=3 does not divide ...

and the program exits with status 1, as before.  ``GRNN_FULL_ERROR=1`` prints the
traceback too.  Every other exception (a bug, or fairseq's own errors) keeps its traceback.
"""
import os
import sys

FULL_ERROR_ENV = "GRNN_FULL_ERROR"


class ConfigError(ValueError):
    """An option, data file or checkpoint this package cannot use; the message says why
    and what to do instead."""


def switch(variable, value):
    """A 0|1 switch (the value of the environment variable ``variable``, or what a test
    put in its place), checked -> bool."""
    if value not in ("0", "1"):
        raise ConfigError(f"{variable}={value!r}: expected 0 or 1")
    return value == "1"


def config_error_in(exc):
    """The ConfigError that caused ``exc`` (``exc`` itself, or one it was raised while
    handling: fairseq's trainer re-raises checkpoint errors as "Cannot load model
    parameters ..."), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def short_message(exc, program):
    """What the hook prints for ``exc``, or None to print the usual traceback."""
    cause = config_error_in(exc)
    if cause is None or os.environ.get(FULL_ERROR_ENV, "") not in ("", "0"):
        return None
    lines = [f"{program}: error: {cause}"]
    if cause is not exc:
        lines.append(f"  (raised while: {type(exc).__name__}: {exc})")
    lines.append(f"  (set {FULL_ERROR_ENV}=1 for the traceback)")
    return "\n".join(lines) + "\n"


def install_excepthook():
    """Print an uncaught ConfigError as one error line; chain to the previous hook
    otherwise.  Installed once, when the plugin is imported."""
    previous = sys.excepthook
    if getattr(previous, "_grnn_config_errors", False):
        return

    def hook(kind, exc, tb):
        message = short_message(exc, os.path.basename(sys.argv[0]) if sys.argv else "python")
        if message is None:
            previous(kind, exc, tb)
        else:
            sys.stderr.write(message)

    hook._grnn_config_errors = True
    sys.excepthook = hook
