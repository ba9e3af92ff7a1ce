#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in stages that each fit one 10-minute call of a lent
# machine; every stage writes its log and tables to $OUT (default results/gpu), prefixed by
# the device and the command, so the figures can be copied into results/ and the README.
#
#   scripts/gpu-checks.sh tests     # the GPU tests: Triton kernels compiled for real
#                                   # (tests/test_triton_engine.py without the interpreter)
#                                   # and --fp16/--amp/--bf16 training (tests/test_gpu_training.py)
#   scripts/gpu-checks.sh layer     # scripts/bench_layer.py: bf16 T=50 B=64 H=1024 vs cuDNN,
#                                   # decode steps vs LSTMCell; backends triton and torch
#   scripts/gpu-checks.sh fairseq   # scripts/bench_fairseq.sh: fairseq-train / -generate
#                                   # throughput vs fairseq's lstm archs (synthetic data)
#   scripts/gpu-checks.sh all       # the three in order
#
# On the project's lent machine (see DEVELOPERS.md), from the repository root:
#   source .whl/device-setup.sh .whl && bash scripts/gpu-checks.sh tests
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
out="${OUT:-$root/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

case "${1:-}" in
  tests|layer|fairseq|all) ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu-checks: torch sees no CUDA GPU; these checks need one (CPU checks: bash scripts/test.sh)" >&2
  exit 2
fi
device="$("$py" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__)')"

stage_tests() {
  # -o addopts= : the machine may lack pytest-timeout, which pytest.ini's addopts needs
  "$py" -m pytest -o addopts= -p no:cacheprovider -q -rs \
    tests/test_triton_engine.py tests/test_gpu_training.py 2>&1 | tee "$out/tests.txt"
  return "${PIPESTATUS[0]}"
}

stage_layer() {
  { echo "device: $device"
    "$py" scripts/bench_layer.py --device cuda --backend triton,torch --groups 1,2,4,8,16 \
      --rearrangement none,time --modes train,infer,decode
  } 2>&1 | tee "$out/bench_layer_cuda.txt"
  return "${PIPESTATUS[0]}"
}

stage_fairseq() {
  { echo "device: $device"
    bash scripts/bench_fairseq.sh --updates 200 --backends "auto"
  } 2>&1 | tee "$out/bench_fairseq_cuda.txt"
  return "${PIPESTATUS[0]}"
}

case "${1:-}" in
  tests) stage_tests ;;
  layer) stage_layer ;;
  fairseq) stage_fairseq ;;
  all) rc=0; stage_tests || rc=1; stage_layer || rc=1; stage_fairseq || rc=1; exit $rc ;;
esac
