"""fairseq models of grnn-fairseq (registered on import)."""
from . import rnnsearch  # noqa: F401
from . import rnn_lm  # noqa: F401
