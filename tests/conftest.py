"""Session-wide test setup."""
import os

# Without a GPU the Triton kernels run only through Triton's interpreter, which Triton
# chooses when it is first imported: set it before any test module imports Triton, so the
# kernel tests (tests/test_triton_engine.py) run in CI instead of skipping.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
