#!/usr/bin/env bash
# The recurrent layers' input projection on the CPU by oneDNN (the default since
# 2026-12-07, session 27) against PyTorch's products (MKL's sgemm, GRNN_CPU_GEMM=blas), on
# the same code, side by side.  MKL runs its AVX2 code on AMD CPUs with AVX-512, where
# oneDNN (torch.nn.LSTM's library) runs AVX-512: see grnn_fairseq/kernels/onednn.py.
# (On Intel CPUs MKL is the faster one, and the default since session 30:
# results/cpu_gemm_intel.txt; on CPUs without AVX-512 too, since session 31:
# results/cpu_gemm_zen4.txt.)
#
# First bench_layer.py with both in one process (cpp-blas against cpp-onednn, each against
# torch.nn), ROUNDS times.  Then whole fairseq training steps of the models in ARCHS
# (default: the IWSLT-sized K=4, K=16 and K=1; results/cpu_training_tok_s.py on
# data-bin/debian from scripts/prepare-debian.sh), blas and onednn in turn, ROUNDS times;
# ARCHS="" skips them.
#   source .venv/bin/activate && bash results/cpu_onednn_ab.sh [ROUNDS]   (default 2)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds="${1:-2}"
if [[ ! "$rounds" =~ ^[1-9][0-9]*$ ]]; then
  echo "ROUNDS=$rounds: give a whole number of rounds, at least 1" >&2
  exit 2
fi
archs="${ARCHS-group_rnnsearch_k4 group_rnnsearch_k16 rnnsearch}"
if [[ -n "$archs" && ! -d "$root/data-bin/debian/deen/data-bin" ]]; then
  echo "$root/data-bin/debian/deen/data-bin is missing: run scripts/prepare-debian.sh --binarize, or ARCHS=\"\" for the layer only" >&2
  exit 2
fi
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 PYTHONPATH="$root"
cd "$root"
echo "command: ARCHS=\"$archs\" bash results/cpu_onednn_ab.sh $rounds ($(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' + uncommitted changes'))"
for round in $(seq "$rounds"); do
  echo "== round $round"
  python scripts/bench_layer.py --groups 1,4,16 --rearrangement time --modes train,infer,decode \
    --backend cpp-blas,cpp-onednn --reps 7 2>&1 | grep -E "^(device|mode|train|infer|decode)"
done
for round in $(seq "$rounds"); do
  for arch in $archs; do
    for gemm in blas onednn; do
      echo "== round $round, GRNN_CPU_GEMM=$gemm: $(GRNN_CPU_GEMM=$gemm python results/cpu_training_tok_s.py "$arch" 2>&1 | tail -1)"
    done
  done
done
