#!/usr/bin/env bash
# Creates (once) the project's virtual environment in $GRNN_VENV (default: .venv) with
# torch (CPU), fairseq-fixed 0.12.3.1 and grnn-fairseq installed editable with its test
# extra.  Safe to run again: finished steps are skipped.
#   TORCH_SPEC     what pip installs for torch (default torch==2.13.0)
#   GRNN_FAIRSEQ   "fixed" (default: pip installs fairseq-fixed==0.12.3.1) or "existing"
#                  (use a fairseq already importable in that environment; never install a
#                  second copy of the `fairseq` package)
#   GRNN_CONSTRAINTS  the pinned versions of everything else, with "fixed" (default
#                  scripts/constraints.txt, what CI tests; empty: the newest that setup.py
#                  allows). With "existing" nothing is pinned: the environment is yours.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GRNN_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CONSTRAINTS=${GRNN_CONSTRAINTS-scripts/constraints.txt}
pins=()
if [ "${GRNN_FAIRSEQ:-fixed}" = fixed ] && [ -n "$CONSTRAINTS" ]; then
  if [ ! -f "$CONSTRAINTS" ]; then
    echo "[setup] GRNN_CONSTRAINTS=$CONSTRAINTS: no such file (set it to a pip constraints" \
      "file, or to an empty value to install the newest versions setup.py allows)" >&2
    exit 2
  fi
  pins=(-c "$CONSTRAINTS")
fi
# done before, setup.py unchanged since, and installed with these pins: nothing to do
marker="$VENV/.grnn-setup-done"
if [ -f "$marker" ] && [ "$marker" -nt setup.py ] \
    && { [ ${#pins[@]} -eq 0 ] || cmp -s "$CONSTRAINTS" "$VENV/.grnn-constraints"; }; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel >&2
echo "[setup] installing $TORCH_SPEC" >&2
pip install -q ${pins[@]+"${pins[@]}"} "$TORCH_SPEC" >&2
extras=test
if [ "${GRNN_FAIRSEQ:-fixed}" = fixed ]; then
  extras="fairseq,test"
  echo "[setup] installing fairseq-fixed 0.12.3.1 (first build takes ~6 minutes; pip caches it)" >&2
fi
pip install -q ${pins[@]+"${pins[@]}"} -e ".[$extras]" >&2
"$VENV/bin/python" -c "import grnn_fairseq; assert grnn_fairseq.HAVE_FAIRSEQ, 'fairseq is not importable'" >&2
# what was pinned, for tests/test_packaging.py (empty: nothing)
if [ ${#pins[@]} -gt 0 ]; then cp "$CONSTRAINTS" "$VENV/.grnn-constraints"; else : > "$VENV/.grnn-constraints"; fi
touch "$marker"
echo "[setup] ready: $VENV" >&2
