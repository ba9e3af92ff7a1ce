#!/usr/bin/env bash
# WikiText-2 (wikitext-2-v1.zip), word level, vocabulary kept exactly (fairseq-preprocess --only-source --padding-factor 1).
#
# Downloads (or takes with --archive PATH / GRNN_ARCHIVES) and checks the archive(s),
# then builds data-bin/wikitext-2 for fairseq.  All logic is in scripts/dataprep.py;
# `prepare-wikitext2.sh --help` lists the options.  Example:
#   scripts/prepare-wikitext2.sh
# Reruns skip finished steps; PYTHON picks the interpreter (one with fairseq).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATAPREP_PROG="$(basename "$0")" exec "${PYTHON:-python3}" "$here/dataprep.py" wikitext-2 "$@"
