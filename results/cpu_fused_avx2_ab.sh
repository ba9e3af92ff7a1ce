#!/usr/bin/env bash
# The C++ engine's fused fp32 forward step before and after its register tile followed the
# vector unit (2026-12-07, session 26), on a CPU with AVX2 but no AVX-512.
#
# Before, the step had one tile for every CPU: 16-float vectors, 4 batch rows, all gates
# at once: 16 accumulators.  AVX-512 holds them in 16 of its 32 zmm registers; AVX2's
# clone needs 32 ymm registers for them (and 8 for the weights) out of 16, and GCC's "avx2"
# clone has no FMA.  After: 8 floats and 2 rows for the LSTM with AVX2 + FMA.
#
# A library built from another commit cannot be loaded beside this one (same op names), so
# each round runs bench_layer.py once in a worktree of OLD and once in this checkout, in
# turn.  The robust figure is each run's own fused / two-pass ratio (cpp against cpp-2pass,
# GRNN_CPU_FUSED=0, side by side in one process); the times across runs are noisier.
# Then whole fairseq training steps of the models in ARCHS (default: the IWSLT-sized K=4,
# K=16 and K=1; results/cpu_training_tok_s.py on data-bin/debian from
# scripts/prepare-debian.sh), the two versions in turn, ROUNDS times; ARCHS="" skips them.
#   source .venv/bin/activate && bash results/cpu_fused_avx2_ab.sh [OLD_COMMIT] [ROUNDS]
#   (OLD_COMMIT default 992e22f, the last commit before the change; ROUNDS default 2)
# Any two commits compare so: results/cpu_backward_product_ab.txt is OLD_COMMIT 7620232.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
old="${1:-992e22f}"
rounds="${2:-2}"
if [[ ! "$rounds" =~ ^[1-9][0-9]*$ ]]; then
  echo "ROUNDS=$rounds: give a whole number of rounds, at least 1" >&2
  exit 2
fi
if ! git -C "$root" rev-parse --verify -q "$old^{commit}" > /dev/null; then
  echo "$old is not a commit of $root: give the commit to compare with (e.g. 992e22f)" >&2
  exit 2
fi
archs="${ARCHS-group_rnnsearch_k4 group_rnnsearch_k16 rnnsearch}"
if [[ -n "$archs" && ! -d "$root/data-bin/debian/deen/data-bin" ]]; then
  echo "$root/data-bin/debian/deen/data-bin is missing: run scripts/prepare-debian.sh --binarize, or ARCHS=\"\" for the layer only" >&2
  exit 2
fi
tree="$(mktemp -d)/old"
git -C "$root" worktree add -q --detach "$tree" "$old"
trap 'git -C "$root" worktree remove --force "$tree"' EXIT
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
args=(--groups 4,16 --rearrangement time --modes infer,train --backend cpp-2pass,cpp --reps 7)
echo "command: ARCHS=\"$archs\" bash results/cpu_fused_avx2_ab.sh $old $rounds"
grep -m1 "model name" /proc/cpuinfo
grep -m1 -o -w "avx512f" /proc/cpuinfo || echo "no avx512f in /proc/cpuinfo"
for round in $(seq "$rounds"); do
  for side in old new; do
    if [[ $side == old ]]; then dir="$tree"; else dir="$root"; fi
    echo "== round $round, $side ($(git -C "$dir" rev-parse --short HEAD)$([[ $side == new ]] && ! git -C "$dir" diff --quiet HEAD && echo ' + uncommitted changes'))"
    (cd "$dir" && PYTHONPATH="$dir" python scripts/bench_layer.py "${args[@]}" 2>&1 |
      grep -E "^(device|mode|infer|train)")
  done
done
# the old tree runs this script with its own copy of the code and of debian_training_setup
ln -s "$root/data-bin" "$tree/data-bin"
cp "$root/results/cpu_training_tok_s.py" "$root/results/debian_training_setup.py" "$tree/results/"
for round in $(seq "$rounds"); do
  for arch in $archs; do
    for side in old new; do
      if [[ $side == old ]]; then dir="$tree"; else dir="$root"; fi
      echo "== round $round, $side: $(cd "$dir" && PYTHONPATH="$dir" python results/cpu_training_tok_s.py "$arch" 2>&1 | tail -1)"
    done
  done
done
