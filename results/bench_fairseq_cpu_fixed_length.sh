#!/usr/bin/env bash
# fairseq-generate throughput on the CPU at a fixed output length: every hypothesis is
# exactly 20 tokens (--min-len 20 --max-len-a 0 --max-len-b 20), so tokens/s compares the
# models step for step.  The checkpoints are those of the two bench_fairseq.sh runs of
# bench_fairseq_cpu_{wmt,iwslt}.txt (kept with --workdir).  Beam 5, --max-tokens 1000, the
# 736 test sentences, 2 threads.
#
# This machine is shared and noisy: one generation of the same checkpoint has taken from
# 24 s to 68 s.  So every checkpoint runs ROUNDS times (default 3), the models in turn
# within each round, and the table gives the median with the range.
#   source .venv/bin/activate && bash results/bench_fairseq_cpu_fixed_length.sh [BENCH_WORKDIR]
#   (BENCH_WORKDIR: the parent of the two --workdir folders wmt/ and iwslt/; default work/bench22)
# ATTENTION="0 1" runs each of our checkpoints once per value of GRNN_CPU_ATTENTION in every
# round (PyTorch's attention ops, then the fused C++ pass): an A/B side by side.  Default 1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="${1:-$root/work/bench22}"
rounds="${ROUNDS:-3}"
if [[ ! "$rounds" =~ ^[1-9][0-9]*$ ]]; then
  echo "ROUNDS=$rounds: give a whole number of rounds, at least 1 (default 3)" >&2
  exit 2
fi
attention="${ATTENTION:-1}"
if [[ ! "$attention" =~ ^[01]( [01])*$ ]]; then
  echo "ATTENTION=$attention: give values of GRNN_CPU_ATTENTION, 0 or 1, separated by spaces (e.g. \"0 1\")" >&2
  exit 2
fi
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
python -c 'import torch; print("cpu, 2 threads; torch", torch.__version__)'
echo "rounds: $rounds (the models in turn within each round); tokens/s: median [min, max]"
ckpts=("$bench"/wmt/ckpt.*/checkpoint_last.pt "$bench"/iwslt/ckpt.*/checkpoint_last.pt)
for ckpt in "${ckpts[@]}"; do
  [[ -f "$ckpt" ]] || { echo "no checkpoint $ckpt: run the bench_fairseq.sh commands first" >&2; exit 1; }
done
runs=()  # checkpoint|GRNN_CPU_ATTENTION (empty for fairseq's own models, which it does not touch)
for ckpt in "${ckpts[@]}"; do
  case "$(basename "$(dirname "$ckpt")")" in
    ckpt.lstm_*) runs+=("$ckpt|") ;;
    *) for a in $attention; do runs+=("$ckpt|$a"); done ;;
  esac
done
declare -A speeds
for ((r = 1; r <= rounds; r++)); do
  for run in "${runs[@]}"; do
    ckpt="${run%|*}" a="${run##*|}"
    log="$(mktemp)"
    GRNN_CPU_ATTENTION="${a:-1}" fairseq-generate "$root/data-bin/debian/deen/data-bin" -s de -t en --user-dir "$root/grnn_fairseq" \
      --cpu --task translation --path "$ckpt" --gen-subset test --beam 5 --max-tokens 1000 \
      --num-workers 0 --min-len 20 --max-len-a 0 --max-len-b 20 > "$log" 2>&1 \
      || { tail -5 "$log" >&2; exit 1; }
    tok="$(grep -o 'Translated .*' "$log" | sed -E 's/.*, ([0-9.]+) tokens\/s.*/\1/')"
    speeds[$run]+="$tok "
    rm -f "$log"
  done
done
printf '%-42s %10s  %s\n' checkpoint "tokens/s" "[min, max] over the rounds"
for run in "${runs[@]}"; do
  ckpt="${run%|*}" a="${run##*|}"
  name="$(basename "$(dirname "$ckpt")")"; name="${name#ckpt.}"
  [[ -z "$a" || "$attention" == "1" ]] || name="$name attention=$a"
  python - "$name" ${speeds[$run]} <<'EOF'
import statistics, sys
name, v = sys.argv[1], [float(x) for x in sys.argv[2:]]
print(f"{name:<42} {statistics.median(v):10.1f}  [{min(v):.1f}, {max(v):.1f}]")
EOF
done
