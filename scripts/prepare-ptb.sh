#!/usr/bin/env bash
# Penn Treebank (Mikolov's simple-examples.tgz), word level, the 10k vocabulary kept exactly (fairseq-preprocess --only-source --padding-factor 1).
#
# Downloads (or takes with --archive PATH / GRNN_ARCHIVES) and checks the archive(s),
# then builds data-bin/ptb for fairseq.  All logic is in scripts/dataprep.py;
# `prepare-ptb.sh --help` lists the options.  Example:
#   scripts/prepare-ptb.sh --no-verify
# Reruns skip finished steps; PYTHON picks the interpreter (one with fairseq).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATAPREP_PROG="$(basename "$0")" exec "${PYTHON:-python3}" "$here/dataprep.py" ptb "$@"
