#!/usr/bin/env bash
# WMT14 English-German: Europarl v7 + Common Crawl + News Commentary v9 for training, newstest2013 valid, newstest2014 (full) test, joint sentencepiece (32k), joined dictionary.
#
# Downloads (or takes with --archive PATH / GRNN_ARCHIVES) and checks the archive(s),
# then builds data-bin/wmt14.en-de for fairseq.  All logic is in scripts/dataprep.py;
# `prepare-wmt14-en-de.sh --help` lists the options.  Example:
#   scripts/prepare-wmt14-en-de.sh --vocab-size 32000 --archive ~/wmt14-archives/ --workers 16
# Reruns skip finished steps; PYTHON picks the interpreter (one with fairseq).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATAPREP_PROG="$(basename "$0")" exec "${PYTHON:-python3}" "$here/dataprep.py" wmt14-en-de "$@"
