#!/usr/bin/env bash
# Reference points for the summarization pilot (README, "Summarization, CPU pilot"):
# ROUGE of the first N words of each test description ("lead-N"), and of the most frequent
# training synopsis repeated for every test pair.  Scored with the project's grnn-rouge
# (rouge-score, stemming, F1 x 100), the same scorer as fairseq-generate --scoring rouge.
# Run from the repository root after scripts/prepare_debian.py; output:
# results/debian_summ_lead_baseline.txt
set -euo pipefail
RAW=${RAW:-data-bin/debian/summ/raw}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
score() {  # score HYP: grnn-rouge against the test synopses; its log is shown if it fails
    grnn-rouge --ref "$RAW/test.tgt" --hyp "$1" 2> "$TMP/log" || { cat "$TMP/log" >&2; exit 1; }
}
for n in 6 8 10; do
    awk -v n="$n" '{ s = ""; for (i = 1; i <= n && i <= NF; i++) s = s (i > 1 ? " " : "") $i; print s }' \
        "$RAW/test.src" > "$TMP/lead$n"
    line=$(score "$TMP/lead$n"); echo "lead-$n: $line"
done
top=$(awk '{ c[$0]++ } END { for (s in c) if (c[s] > n || (c[s] == n && s < best)) { n = c[s]; best = s }; print best }' \
    "$RAW/train.tgt")
awk -v s="$top" '{ print s }' "$RAW/test.src" > "$TMP/const"
line=$(score "$TMP/const"); echo "constant \"$top\": $line"
echo "mean words per test synopsis: $(awk '{ w += NF } END { printf "%.2f", w / NR }' "$RAW/test.tgt")"
