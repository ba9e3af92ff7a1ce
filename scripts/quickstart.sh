#!/usr/bin/env bash
# The README's main command on a fresh machine (CPU is enough):
#   1. sets up .venv (scripts/setup-env.sh; the first fairseq build takes ~6 minutes),
#   2. binarizes the shipped German-English sample (data/debian-sample/deen, 3000 training
#      pairs) with a 2000-piece sentencepiece vocabulary (scripts/spm_binarize.py),
#   3. trains a small 2-group RNNSearch (configs/quickstart.yaml) with progress shown,
#      averages the last 3 epoch checkpoints, computes BLEU on the test split with beam 5
#      (sacrebleu on detokenized output), translates a few German sentences with
#      fairseq-interactive and prints a results table.
# Steps 2-3 take about 10 minutes on 2 CPU cores.  Everything goes to work/quickstart/; a
# second run reuses the data and the finished training (rm -rf work/quickstart to redo
# it).  Extra arguments go to scripts/run_experiment.py (e.g. --override "train.max-epoch=4").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
PY=${GRNN_VENV:-.venv}/bin/python
start=$(date +%s)
"$PY" scripts/run_experiment.py configs/quickstart.yaml --prepare \
    --results work/quickstart/results.tsv "$@"
"$PY" scripts/report.py work/quickstart/results.tsv --out work/quickstart/report 2>/dev/null \
    | sed 's/^/[report] /' || true
secs=$(( $(date +%s) - start ))
echo
echo "quickstart finished in $((secs / 60)) min $((secs % 60)) s; checkpoints and logs in work/quickstart/"
