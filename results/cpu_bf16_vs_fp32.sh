#!/usr/bin/env bash
# fairseq-train --bf16 against fp32 on the CPU (README, "Half precision"): a small
# group_rnnsearch_k2 on the quickstart's data (run scripts/quickstart.sh first), 40 updates,
# no validation, alternating fp32 / bf16 twice; prints the final train loss and wps of each.
#   bash results/cpu_bf16_vs_fp32.sh > results/cpu_bf16_vs_fp32.txt
set -uo pipefail
cd "$(dirname "$0")/.."
echo "# $(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, commit $(git rev-parse --short HEAD)"
for precision in fp32 bf16 fp32 bf16; do
  flag=(); [[ $precision == bf16 ]] && flag=(--bf16)
  line=$(.venv/bin/fairseq-train work/quickstart/data/data-bin --user-dir grnn_fairseq \
    --arch group_rnnsearch_k2 --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 64 \
    --decoder-embed-dim 64 --encoder-hidden-size 64 --decoder-hidden-size 64 --attention-dim 64 \
    --task translation --source-lang de --target-lang en --optimizer adam --lr 0.003 \
    --max-tokens 800 --max-update 40 --cpu "${flag[@]}" --no-save --log-interval 10 \
    --log-format simple --num-workers 0 --disable-validation 2>&1 | grep " | train | ")
  echo "$precision  $(grep -o 'loss [0-9.]*' <<<"$line")  $(grep -o 'wps [0-9.]*' <<<"$line")"
done
