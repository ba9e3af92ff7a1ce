#!/usr/bin/env bash
# fairseq-generate throughput on the CPU at a fixed output length: every hypothesis is
# exactly 20 tokens (--min-len 20 --max-len-a 0 --max-len-b 20), so tokens/s compares the
# models step for step.  The checkpoints are those of the two bench_fairseq.sh runs of
# bench_fairseq_cpu_{wmt,iwslt}.txt (kept with --workdir; 75 and 300 updates): after so
# little training the models stop at very different lengths (the WMT-sized K=1 model's
# outputs are a third of the references, K=4's nine tenths), which confounds the tokens/s
# of those runs.  Beam 5, --max-tokens 1000, the 736 test sentences, 2 threads, one model
# after the other.
#   source .venv/bin/activate && bash results/bench_fairseq_cpu_fixed_length.sh [BENCH_WORKDIR]
#   (BENCH_WORKDIR: the parent of the two --workdir folders wmt/ and iwslt/; default work/bench8)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="${1:-$root/work/bench8}"
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
python -c 'import torch; print("cpu, 2 threads; torch", torch.__version__)'
printf '%-42s %10s %10s\n' checkpoint "tokens/s" "sent/s"
for ckpt in "$bench"/wmt/ckpt.*/checkpoint_last.pt "$bench"/iwslt/ckpt.*/checkpoint_last.pt; do
  [[ -f "$ckpt" ]] || { echo "no checkpoint $ckpt: run the bench_fairseq.sh commands first" >&2; exit 1; }
  name="$(basename "$(dirname "$ckpt")")"; name="${name#ckpt.}"
  log="$(mktemp)"
  fairseq-generate "$root/data-bin/debian/deen/data-bin" -s de -t en --user-dir "$root/grnn_fairseq" \
    --cpu --task translation --path "$ckpt" --gen-subset test --beam 5 --max-tokens 1000 \
    --num-workers 0 --min-len 20 --max-len-a 0 --max-len-b 20 > "$log" 2>&1 \
    || { tail -5 "$log" >&2; exit 1; }
  line="$(grep -o 'Translated .*' "$log")"
  tok="$(sed -E 's/.*, ([0-9.]+) tokens\/s.*/\1/' <<< "$line")"
  sent="$(sed -E 's/.*\(([0-9.]+) sentences\/s.*/\1/' <<< "$line")"
  printf '%-42s %10s %10s   (%s)\n' "$name" "$tok" "$sent" "$(sed -E 's/Translated ([0-9,]+) sentences \(([0-9,]+) tokens\).*/\1 sentences, \2 tokens/' <<< "$line")"
  rm -f "$log"
done
