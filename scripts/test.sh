#!/usr/bin/env bash
# The project's test command: sets up the environment if needed, then runs the tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k recurrent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
VENV=${GRNN_VENV:-.venv}
exec "$VENV/bin/python" -m pytest "$@"
