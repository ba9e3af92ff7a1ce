#!/usr/bin/env bash
# Gigaword headline generation (Rush et al. 2015 split: sumdata/train + the 1951-pair Giga test set), UNK -> fairseq <unk>, joint sentencepiece (30k), languages src/tgt.
#
# Downloads (or takes with --archive PATH / GRNN_ARCHIVES) and checks the archive(s),
# then builds data-bin/gigaword for fairseq.  All logic is in scripts/dataprep.py;
# `prepare-gigaword.sh --help` lists the options.  Example:
#   scripts/prepare-gigaword.sh --archive ~/Downloads/summary.tar.gz
# Reruns skip finished steps; PYTHON picks the interpreter (one with fairseq).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATAPREP_PROG="$(basename "$0")" exec "${PYTHON:-python3}" "$here/dataprep.py" gigaword "$@"
