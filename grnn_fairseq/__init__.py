"""grnn-fairseq: group (Gao et al., NAACL 2018) and restricted (Diao et al., BigData 2019)
recurrent networks as a fairseq plugin.

Use it with ``--user-dir grnn_fairseq`` (the path of this folder) or, once installed,
``--user-dir $(python -c 'import grnn_fairseq, os; print(os.path.dirname(grnn_fairseq.__file__))')``.

The recurrent layers (:mod:`grnn_fairseq.recurrent`) are plain PyTorch and work without
fairseq; the fairseq models, the ROUGE scorer and the compatibility fixes for the current
stack are registered here when fairseq is importable.
"""
import warnings

from .errors import install_excepthook

__version__ = "0.1.0"

install_excepthook()  # a ConfigError ending a fairseq command prints as one line (errors.py)

try:
    import fairseq  # noqa: F401
except ImportError:  # layers only; fairseq components need `pip install grnn-fairseq[fairseq]`
    HAVE_FAIRSEQ = False
else:
    HAVE_FAIRSEQ = True

if HAVE_FAIRSEQ:
    # Order matters: compatibility fixes before anything that loads data or checkpoints.
    from . import compat  # noqa: F401
    from . import cpu_memory

    cpu_memory.apply()  # glibc keeps freed memory on CPU-only machines (see the module)
    # `python -m grnn_fairseq.scoring` (the ROUGE CLI) imports this package, so the module
    # is in sys.modules before runpy runs it as __main__, and runpy warns about that.  The
    # second run is harmless (its scorer registration is guarded), so that one warning is
    # silenced; every other warning is left as it is.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy",
                            message="'grnn_fairseq.scoring' found in sys.modules")
    from . import scoring  # noqa: F401
    from . import models  # noqa: F401
    from . import bptt  # noqa: F401  (task bptt_language_modeling)
