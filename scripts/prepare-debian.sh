#!/usr/bin/env bash
# Thin wrapper around scripts/prepare_debian.py (see `--help`).
#
#   scripts/prepare-debian.sh --src ../shared/data/debian-i18n --out data-bin/debian --binarize
#
# Uses $PYTHON if set, else the project's virtualenv (.venv or /work/venv) if present,
# else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  for cand in "$here/../.venv/bin/python" /work/venv/bin/python; do
    if [[ -x "$cand" ]]; then py="$cand"; break; fi
  done
fi
exec "${py:-python3}" "$here/prepare_debian.py" "$@"
