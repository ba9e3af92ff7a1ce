#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in stages that each fit one 10-minute call of a lent
# machine; every stage writes its log and tables to $OUT (default results/gpu), prefixed by
# the device and the command, so the figures can be copied into results/ and the README.
#
#   scripts/gpu-checks.sh kernels   # tests/test_triton_engine.py compiled for real (no
#                                   # interpreter): persistent scans, barriers, decode step
#                                   # (about 2 minutes on an H100, compilation included);
#                                   # tests/test_decode_graphs.py with real CUDA graphs
#   scripts/gpu-checks.sh training  # tests/test_gpu_training.py: --fp16/--amp/--bf16
#                                   # fairseq training (more than 4 minutes: its own call)
#   scripts/gpu-checks.sh layer     # scripts/bench_layer.py: bf16 T=50 B=64 H=1024 vs cuDNN,
#                                   # decode steps vs LSTMCell (also as CUDA graphs, both);
#                                   # backends triton and torch;
#                                   # steps with autograd (a decoder in training) vs
#                                   # LSTMCell, triton with and without its fused training
#                                   # step (GRNN_TRITON_TRAIN_STEP); then GRU and RNN vs
#                                   # nn.GRU / GRUCell, nn.RNN / RNNCell
#   scripts/gpu-checks.sh variants  # the persistent scans' A/B variants side by side
#                                   # (barrier polling by loads, resident W_hh, W_hh's
#                                   # columns permuted for the time shuffle; VARIANT in
#                                   # kernels/triton_rnn.py): their tests compiled, then
#                                   # bench_layer.py train/infer, LSTM K=1,4,16 (~4 minutes)
#   scripts/gpu-checks.sh wmt       # scripts/bench_fairseq.sh, WMT14 sizes: group K=4, K=1,
#   scripts/gpu-checks.sh iwslt     # fairseq's lstm_luong_wmt_en_de (resp. IWSLT sizes and
#                                   # lstm_wiseman_iwslt_de_en); --fp16, 100 untimed warm-up
#                                   # updates, then 200 timed ones; on the Debian De-En
#                                   # corpus when data-bin/debian/deen/data-bin is there
#                                   # (carry it), else on synthetic data; with
#                                   # GRNN_TRITON_TRAIN_STEP=1 set, the decoders train with
#                                   # the fused training step
#   scripts/gpu-checks.sh trainstep # scripts/bench_fairseq.sh, WMT14 sizes, group K=4 and
#                                   # K=1, each three times: as they are, trained with the
#                                   # fused training step (GRNN_TRITON_TRAIN_STEP) and
#                                   # decoded from CUDA graphs (GRNN_DECODE_GRAPHS), and
#                                   # with the fused attention too (GRNN_TRITON_ATTENTION);
#                                   # --fp16, 50 untimed warm-up updates, then 100 timed ones
#   scripts/gpu-checks.sh all       # all of them in order (over 20 minutes)
#   scripts/gpu-checks.sh first     # for a lease of 15 device-minutes (one call): the most
#                                   # needed parts of the above, most needed first, each
#                                   # bounded, all within GPU_CHECKS_SECONDS (default 450 s):
#                                   # the kernel tests only a GPU runs (barriers of many
#                                   # programs, bf16, variants, the training step); decoding
#                                   # from CUDA graphs tested; the variants timed (LSTM
#                                   # K=4,16); decode steps, eager and as graphs; steps
#                                   # with autograd (training step on / off); the fused
#                                   # attention against PyTorch's; GRU and RNN timed; then
#                                   # with the time left the fairseq --fp16/--amp/--bf16 training
#                                   # tests, and the other kernel tests compiled
#
# On the project's lent machine (see DEVELOPERS.md), from the repository root:
#   source .whl/device-setup.sh .whl && bash scripts/gpu-checks.sh kernels
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
out="${OUT:-$root/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

case "${1:-}" in
  kernels|training|layer|variants|wmt|iwslt|trainstep|all|first) ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 2 ;;  # this header
esac
if [[ ! "${GPU_CHECKS_SECONDS:-450}" =~ ^[0-9]+$ ]]; then
  echo "gpu-checks: GPU_CHECKS_SECONDS=${GPU_CHECKS_SECONDS} is not a whole number of seconds (default 450)" >&2
  exit 2
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu-checks: torch sees no CUDA GPU; these checks need one (CPU checks: bash scripts/test.sh)" >&2
  exit 2
fi
device="$("$py" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__)')"
# -o addopts= : the machine may lack pytest-timeout, which pytest.ini's addopts needs
pytest=("$py" -m pytest -o addopts= -p no:cacheprovider -q -rs)

stage_kernels() {
  "${pytest[@]}" tests/test_triton_engine.py tests/test_decode_graphs.py 2>&1 \
    | tee "$out/triton_tests.txt"
  return "${PIPESTATUS[0]}"
}

stage_training() {
  "${pytest[@]}" tests/test_gpu_training.py 2>&1 \
    | tee "$out/gpu_training_tests.txt"
  return "${PIPESTATUS[0]}"
}

stage_layer() {
  { echo "device: $device"
    "$py" scripts/bench_layer.py --device cuda --backend triton,torch --groups 1,2,4,8,16 \
      --rearrangement none,time --modes train,infer,decode --graph
  } 2>&1 | tee "$out/bench_layer_cuda.txt"
  local rc="${PIPESTATUS[0]}" cell
  { echo "device: $device"
    "$py" scripts/bench_layer.py --device cuda --backend triton,triton+trainstep \
      --groups 1,4,16 --rearrangement none,time --modes steps
  } 2>&1 | tee "$out/bench_layer_cuda_steps.txt"
  [[ "${PIPESTATUS[0]}" == 0 ]] || rc=1
  for cell in gru rnn; do
    { echo "device: $device"
      "$py" scripts/bench_layer.py --device cuda --cell "$cell" --backend triton,reference \
        --groups 1,4,16 --rearrangement none,time --modes train,infer,decode
    } 2>&1 | tee "$out/bench_layer_cuda_$cell.txt"
    [[ "${PIPESTATUS[0]}" == 0 ]] || rc=1
  done
  return "$rc"
}

stage_variants() {
  { echo "device: $device"
    "${pytest[@]}" tests/test_triton_engine.py \
      -k "variant or resident or permuted"
    "$py" scripts/bench_layer.py --device cuda --groups 1,4,16 --rearrangement none,time \
      --backend triton,triton+load,triton+resident,triton+load+resident,triton+perm \
      --modes train,infer
  } 2>&1 | tee "$out/bench_layer_cuda_variants.txt"
  return "${PIPESTATUS[0]}"
}

stage_fairseq() {  # name, models, [more bench_fairseq.sh options]
  local data_flags=() name="$1" models="$2"
  shift 2
  if [[ -d data-bin/debian/deen/data-bin ]]; then
    data_flags=(--data data-bin/debian/deen/data-bin --src de --tgt en)
  fi
  { echo "device: $device"
    PYTHON="$py" bash scripts/bench_fairseq.sh "${data_flags[@]}" --models "$models" \
      --warmup-updates 100 --updates 200 --train-args "--fp16" --gen-args "--fp16" "$@"
  } 2>&1 | tee "$out/bench_fairseq_$name.txt"
  return "${PIPESTATUS[0]}"
}

# stage first: parts run one after another until the deadline (first_end, set by
# stage_first); each is stopped (SIGINT, so pytest still prints its summary, and bench_layer.py
# the modes it finished and the complete rounds of the one it was timing) when its cap or
# the deadline comes, whichever first
part() {  # cap_seconds log_name command...
  local cap="$1" name="$2"; shift 2
  local t=$((first_end - SECONDS))
  (( t > cap )) && t="$cap"
  if (( t < 30 )); then
    echo "[first] $name: not run, ${t}s left" | tee -a "$out/first_skipped.txt"
    return 1
  fi
  { echo "device: $device"
    echo "command (stopped after ${t}s): $*"
    timeout -s INT -k 20 "$t" "$@"
  } 2>&1 | tee "$out/$name.txt"
  return "${PIPESTATUS[0]}"
}

# the kernel tests that only a GPU can run, or that run there with many programs (barriers),
# in half precision, or with the variants: run first; the others, checked in the
# interpreter on every CI run, only with the time left at the end
gpu_tests="persistent_grid or half_precision or under_autocast or variants or permuted or recompilation or training_step or trains_with or attention"

stage_first() {
  local rc=0 cell first_end=$((SECONDS + ${GPU_CHECKS_SECONDS:-450}))
  part 150 triton_tests_gpu "${pytest[@]}" -k "$gpu_tests" tests/test_triton_engine.py || rc=1
  part 60 decode_graphs_tests "${pytest[@]}" tests/test_decode_graphs.py || rc=1
  part 120 bench_layer_cuda_variants "$py" scripts/bench_layer.py --device cuda --groups 4,16 \
    --rearrangement none,time \
    --backend triton,triton+load,triton+resident,triton+load+resident,triton+perm \
    --modes train,infer || rc=1
  part 45 bench_layer_cuda_decode "$py" scripts/bench_layer.py --device cuda --groups 1,4,16 \
    --rearrangement none,time --backend triton --modes decode --graph || rc=1
  part 45 bench_layer_cuda_steps "$py" scripts/bench_layer.py --device cuda --groups 1,4 \
    --rearrangement time --backend triton,triton+trainstep --modes steps || rc=1
  part 45 bench_attention_cuda "$py" scripts/bench_attention.py --device cuda || rc=1
  for cell in gru rnn; do
    part 45 "bench_layer_cuda_$cell" "$py" scripts/bench_layer.py --device cuda --cell "$cell" \
      --backend triton --groups 4,16 --rearrangement time --modes train,infer,decode || rc=1
  done
  part 600 gpu_training_tests "${pytest[@]}" tests/test_gpu_training.py || rc=1
  part 600 triton_tests_rest "${pytest[@]}" -k "not ($gpu_tests)" tests/test_triton_engine.py \
    || rc=1
  return "$rc"
}

stage_trainstep() {
  stage_fairseq trainstep "group_rnnsearch_wmt_en_de_k4 rnnsearch_wmt_en_de" \
    --backends "auto auto+trainstep+graphs auto+trainstep+attention+graphs" \
    --warmup-updates 50 --updates 100
}

wmt="group_rnnsearch_wmt_en_de_k4 rnnsearch_wmt_en_de lstm_luong_wmt_en_de"
iwslt="group_rnnsearch_k4 rnnsearch lstm_wiseman_iwslt_de_en"
case "${1:-}" in
  kernels) stage_kernels ;;
  training) stage_training ;;
  layer) stage_layer ;;
  variants) stage_variants ;;
  wmt) stage_fairseq wmt "$wmt" ;;
  iwslt) stage_fairseq iwslt "$iwslt" ;;
  trainstep) stage_trainstep ;;
  first) stage_first ;;
  all) rc=0
       stage_kernels || rc=1; stage_training || rc=1; stage_layer || rc=1
       stage_variants || rc=1
       stage_fairseq wmt "$wmt" || rc=1; stage_fairseq iwslt "$iwslt" || rc=1
       stage_trainstep || rc=1
       exit $rc ;;
esac
