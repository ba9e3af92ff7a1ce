#!/usr/bin/env bash
# IWSLT14 German-English: fairseq's split (valid = every 23rd cleaned training pair, test = dev2010 + dev2012 + tst2010-2012), lowercased, length 1-175 / ratio 1.5 filter, joint sentencepiece (10k), separate dictionaries (--joined-dictionary to share).
#
# Downloads (or takes with --archive PATH / GRNN_ARCHIVES) and checks the archive(s),
# then builds data-bin/iwslt14.de-en for fairseq.  All logic is in scripts/dataprep.py;
# `prepare-iwslt14-de-en.sh --help` lists the options.  Example:
#   scripts/prepare-iwslt14-de-en.sh --vocab-size 10000 --archive ~/Downloads/de-en.tgz --no-verify
# Reruns skip finished steps; PYTHON picks the interpreter (one with fairseq).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATAPREP_PROG="$(basename "$0")" exec "${PYTHON:-python3}" "$here/dataprep.py" iwslt14-de-en "$@"
