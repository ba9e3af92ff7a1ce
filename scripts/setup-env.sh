#!/usr/bin/env bash
# Creates (once) the project's virtual environment in $GRNN_VENV (default: .venv) with
# torch (CPU), fairseq-fixed 0.12.3.1 and grnn-fairseq installed editable with its test
# extra.  Safe to run again: finished steps are skipped.
#   TORCH_SPEC     what pip installs for torch (default torch==2.13.0)
#   GRNN_FAIRSEQ   "fixed" (default: pip installs fairseq-fixed==0.12.3.1) or "existing"
#                  (use a fairseq already importable in that environment; never install a
#                  second copy of the `fairseq` package)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GRNN_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
marker="$VENV/.grnn-setup-done"
if [ -f "$marker" ] && [ "$marker" -nt setup.py ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel >&2
echo "[setup] installing $TORCH_SPEC" >&2
pip install -q "$TORCH_SPEC" >&2
extras=test
if [ "${GRNN_FAIRSEQ:-fixed}" = fixed ]; then
  extras="fairseq,test"
  echo "[setup] installing fairseq-fixed 0.12.3.1 (first build takes ~6 minutes; pip caches it)" >&2
fi
pip install -q -e ".[$extras]" >&2
"$VENV/bin/python" -c "import grnn_fairseq; assert grnn_fairseq.HAVE_FAIRSEQ, 'fairseq is not importable'" >&2
touch "$marker"
echo "[setup] ready: $VENV" >&2
