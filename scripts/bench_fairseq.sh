#!/usr/bin/env bash
# End-to-end throughput through fairseq's own commands, every model on the same data:
#
#   training    fairseq-train for a fixed number of updates; target tokens/s = the log's
#               wps (words per second = target tokens per second), median over the log
#               intervals after the first (start-up and warm-up excluded); wpb alongside
#   generation  fairseq-generate --beam 5 on the checkpoint just trained; tokens/s and
#               sentences/s from its final "Translated ..." line.  Every hypothesis is
#               --gen-length tokens long (default 20): after a short training the models
#               stop at very different lengths, which would confound tokens/s
#   ratios      each of our models' tok/s (training, generation) over that of the models of
#               the same sizes (WMT, Gigaword or IWSLT, by the name) that ran too: fairseq's
#               own LSTM, our K=1 RNNSearch, and the same model on the first of --backends
#
# Models: WMT14 En-De sizes   grnn  group_rnnsearch_wmt_en_de_k4, rnnsearch_wmt_en_de
#                              fairseq lstm_luong_wmt_en_de
#         IWSLT14 sizes        grnn  group_rnnsearch_k4, rnnsearch
#                              fairseq lstm_wiseman_iwslt_de_en
#
#   scripts/bench_fairseq.sh --data data-bin/wmt14_en_de --src en --tgt de     # a GPU run
#   scripts/bench_fairseq.sh --quick      # smoke test: synthetic data in a temp dir, tiny
#                                         # models, a few updates, CPU (numbers meaningless)
#
# The data must be binarized with a joined dictionary (--joined-dictionary), which the
# WMT sizes need (they share all embeddings).  Options:
#   --data DIR --src L --tgt L   binarized data (default: synthetic, generated here)
#   --updates N                  training updates per model (default 300; --quick 6)
#   --max-tokens N               tokens per batch, training and generation (default 4096)
#   --models "a b c"             architectures (default: the six above)
#   --backends "auto triton"     grnn engine backends to compare (GRNN_BACKEND; default auto);
#                                X+trainstep: backend X with GRNN_TRITON_TRAIN_STEP=1 (the
#                                decoder trained with the fused training step on the GPU);
#                                X+graphs: with GRNN_DECODE_GRAPHS=1 (generation replays
#                                the decoder's steps from CUDA graphs); X+attention: with
#                                GRNN_TRITON_ATTENTION=1 (RNNSearch's attention as one
#                                Triton kernel each way); combined: X+trainstep+graphs
#   --cpu                        run on CPU (default: GPU when torch sees one)
#   --train-args "..."           extra fairseq-train arguments (e.g. "--fp16")
#   --gen-args "..."             extra fairseq-generate arguments
#   --gen-length N               tokens per hypothesis, EOS excluded (--min-len N
#                                --max-len-a 0 --max-len-b N; default 20; 0: the models'
#                                own lengths)
#   --workdir DIR                keep checkpoints and logs there (default: a temp dir, removed)
#   --rounds N                   train and generate every model N times (default 1), the
#                                models in turn and in reverse order every other round, so
#                                that a slow drift of a shared machine hits all alike; the
#                                table and the ratios take each model's median over the rounds
#                                and list every round's figures
#   --warmup-updates N           first an untimed fairseq-train of N updates per model, so
#                                that one-off costs stay out of the measured run: Triton
#                                compiles a few kernel variants per layer shape in the first
#                                minutes (then cached on disk), cuDNN picks its algorithms
#                                (default 0; 100 recommended on a GPU)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  for cand in "$root/.venv/bin/python" /work/venv/bin/python; do
    if [[ -x "$cand" ]]; then py="$cand"; break; fi
  done
fi
py="${py:-python3}"
bindir="$(dirname "$py")"
# fairseq's console scripts next to the interpreter, else python -m fairseq_cli.X
for name in preprocess train generate; do
  if [[ -x "$bindir/fairseq-$name" ]]; then eval "cmd_$name=(\"\$bindir/fairseq-$name\")"
  else eval "cmd_$name=(\"\$py\" -m fairseq_cli.$name)"; fi
done
# the command as typed, each argument quoted where the shell needs it (so it can be rerun)
command_line="$0"
for arg in "$@"; do
  if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then command_line+=" $arg"
  else command_line+=" '${arg//\'/\'\\\'\'}'"; fi
done

data="" src="" tgt="" updates="" max_tokens=4096 quick=0 cpu=0 workdir="" keep=0
models="group_rnnsearch_wmt_en_de_k4 rnnsearch_wmt_en_de lstm_luong_wmt_en_de group_rnnsearch_k4 rnnsearch lstm_wiseman_iwslt_de_en"
backends="auto" train_args="" gen_args="" warmup=0 gen_length=20 rounds=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) data="$2"; shift 2 ;;
    --src) src="$2"; shift 2 ;;
    --tgt) tgt="$2"; shift 2 ;;
    --updates) updates="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    --models) models="$2"; shift 2 ;;
    --backends) backends="$2"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --quick) quick=1; shift ;;
    --train-args) train_args="$2"; shift 2 ;;
    --gen-args) gen_args="$2"; shift 2 ;;
    --gen-length) gen_length="$2"; shift 2 ;;
    --workdir) workdir="$2"; keep=1; shift 2 ;;
    --warmup-updates) warmup="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;  # this header
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

for opt in "updates=$updates" "max-tokens=$max_tokens" "warmup-updates=$warmup" \
           "gen-length=$gen_length" "rounds=$rounds"; do
  value="${opt#*=}"
  if [[ -n "$value" && ! "$value" =~ ^[0-9]+$ ]]; then
    echo "--${opt%%=*} $value: expected a whole number" >&2; exit 2
  fi
done

if [[ "$rounds" -lt 1 ]]; then
  echo "--rounds $rounds: give at least 1 round" >&2; exit 2
fi

engines="$(PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" -c \
  'from grnn_fairseq.engine import BACKENDS; print("|".join(BACKENDS))' 2>/dev/null)" || {
  echo "bench_fairseq.sh: $py cannot import grnn_fairseq (run scripts/setup-env.sh, or set" \
    "PYTHON to an environment that has it)" >&2; exit 2; }
for backend in $backends; do  # X, X+trainstep, X+graphs, X+attention, combined
  if [[ ! "$backend" =~ ^($engines)(\+(trainstep|graphs|attention))*$ ]]; then
    echo "--backends: $backend: expected an engine backend ($engines), optionally" \
      "followed by +trainstep, +attention and/or +graphs (e.g. auto+trainstep+graphs)" >&2
    exit 2
  fi
done

if [[ -z "$workdir" ]]; then
  workdir="$(mktemp -d "${TMPDIR:-/tmp}/bench_fairseq.XXXXXX")"
  trap 'rm -rf "$workdir"' EXIT
fi
mkdir -p "$workdir"

gpu=0
if [[ $cpu -eq 0 ]] && "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  gpu=1
fi
device_flags=()
if [[ $gpu -eq 0 ]]; then device_flags=(--cpu); fi

tiny_grnn=() tiny_lstm=()
if [[ $quick -eq 1 ]]; then
  updates="${updates:-6}"
  max_tokens=400
  tiny_grnn=(--encoder-embed-dim 16 --encoder-hidden-size 16 --decoder-embed-dim 16
             --decoder-hidden-size 16 --decoder-out-embed-dim 16 --attention-dim 16
             --encoder-layers 1 --decoder-layers 1)
  tiny_lstm=(--encoder-embed-dim 16 --encoder-hidden-size 16 --decoder-embed-dim 16
             --decoder-hidden-size 16 --decoder-out-embed-dim 16
             --encoder-layers 1 --decoder-layers 1)
  # shared cores: one thread per process
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
fi
updates="${updates:-300}"
log_interval=$(( updates >= 50 ? 25 : 2 ))

if [[ -z "$data" ]]; then
  echo "== synthetic data in $workdir/data (target = source reversed and renamed)"
  "$py" - "$workdir/raw" <<'EOF'
import os, random, sys
raw = sys.argv[1]
os.makedirs(raw, exist_ok=True)
rng = random.Random(0)
words = [f"w{i}" for i in range(200)]
for split, n in (("train", 2000), ("valid", 100), ("test", 100)):
    src = [[rng.choice(words) for _ in range(rng.randint(4, 20))] for _ in range(n)]
    with open(f"{raw}/{split}.src", "w") as fs, open(f"{raw}/{split}.tgt", "w") as ft:
        for s in src:
            fs.write(" ".join(s) + "\n")
            ft.write(" ".join("v" + w[1:] for w in reversed(s)) + "\n")
EOF
  "${cmd_preprocess[@]}" --source-lang src --target-lang tgt --joined-dictionary \
    --trainpref "$workdir/raw/train" --validpref "$workdir/raw/valid" \
    --testpref "$workdir/raw/test" --destdir "$workdir/data" --workers 1 \
    > "$workdir/preprocess.log" 2>&1 || { tail -20 "$workdir/preprocess.log"; exit 1; }
  data="$workdir/data" src=src tgt=tgt
fi
lang_flags=()
if [[ -n "$src" ]]; then lang_flags+=(--source-lang "$src"); fi
if [[ -n "$tgt" ]]; then lang_flags+=(--target-lang "$tgt"); fi

echo "== command: $command_line"
"$py" - <<'EOF'
import platform, re, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
if not torch.cuda.is_available():
    try:  # the CPU's model, and the vector unit the C++ fused step is built for
        with open("/proc/cpuinfo") as f:
            dev = (re.findall(r"model name\s*:\s*(.*)", f.read()) or [dev])[0].strip()
    except OSError:
        pass
    from grnn_fairseq.kernels import cpu_rnn, onednn
    dev += (f"; C++ fused step: {cpu_rnn.fused_step_unit() or 'not built'}"
            f"; large products: {onednn.library()}")
print(f"== device: {dev}; torch {torch.__version__}")
EOF
echo "== data: $data; updates: $updates (after $warmup untimed); max tokens: $max_tokens; gpu: $gpu"
length_flags=()
if [[ $gen_length -gt 0 ]]; then
  length_flags=(--min-len "$gen_length" --max-len-a 0 --max-len-b "$gen_length")
  echo "== generation: beam 5, every hypothesis $gen_length tokens + EOS"
else
  echo "== generation: beam 5, the models' own lengths"
fi

results="$workdir/results.tsv"
: > "$results"
parse() {  # parse TRAIN_LOG GEN_LOG -> "wps wpb gen_tok_s gen_sent_s"
  "$py" - "$1" "$2" <<'EOF'
import re, statistics, sys
train, gen = (open(p, errors="replace").read() for p in sys.argv[1:3])
wps = [float(x) for x in re.findall(r"\bwps=([\d.]+)", train)]
wpb = [float(x) for x in re.findall(r"\bwpb=([\d.]+)", train)]
steady = wps[1:] or wps
m = re.search(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
              r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", gen)
print(f"{statistics.median(steady) if steady else float('nan'):.1f}",
      f"{statistics.median(wpb) if wpb else float('nan'):.1f}",
      m.group(5) if m else "nan", m.group(4) if m else "nan")
EOF
}

train() {  # save-dir, updates, log; the model from the loop below (env_backend, model_flags, tiny)
  env "${env_backend[@]}" "${cmd_train[@]}" "$data" "${lang_flags[@]}" "${model_flags[@]}" \
    "${tiny[@]}" "${device_flags[@]}" --task translation \
    --optimizer adam --lr 0.001 --clip-norm 1.0 --criterion cross_entropy \
    --max-tokens "$max_tokens" --max-update "$2" --log-format simple \
    --log-interval "$log_interval" --no-progress-bar --seed 1 --num-workers 0 \
    --save-dir "$1" --no-epoch-checkpoints --save-interval-updates 0 \
    --disable-validation $train_args > "$3" 2>&1
}

run_case() {  # run_case ARCH BACKEND ROUND: train, generate, one row of $results
  local arch="$1" backend="$2" round="$3" sfx="" rc=0
  if [[ $rounds -gt 1 ]]; then sfx=".r$round"; fi
  case "$arch" in
    lstm_*) tiny=("${tiny_lstm[@]}") ;;
    *)      tiny=("${tiny_grnn[@]}") ;;
  esac
  # --user-dir for fairseq's own models too: it only adds models, and its compatibility
  # fixes (torch >= 2.6 checkpoint loading) are needed by fairseq-generate
  model_flags=(--user-dir "$root/grnn_fairseq" --arch "$arch")
  tag="$arch${backend/#-/}"; [[ "$backend" != "-" ]] && tag="$arch.$backend"
  local save="$workdir/ckpt.$tag$sfx" name="$tag$sfx"
  env_backend=()
  if [[ "$backend" != "-" ]]; then
    IFS=+ read -r -a parts <<< "$backend"
    env_backend=(GRNN_BACKEND="${parts[0]}")
    for variant in "${parts[@]:1}"; do
      case "$variant" in
        trainstep) env_backend+=(GRNN_TRITON_TRAIN_STEP=1) ;;
        graphs) env_backend+=(GRNN_DECODE_GRAPHS=1) ;;
        attention) env_backend+=(GRNN_TRITON_ATTENTION=1) ;;
      esac
    done
  fi
  echo "-- $name: training $updates updates${env_backend[*]:+ (${env_backend[*]})}"
  set +e
  if [[ $warmup -gt 0 && $round -eq 1 ]]; then  # one-off costs: once per model
    echo "-- $name: warm-up, $warmup untimed updates"
    train "$save.warmup" "$warmup" "$workdir/warmup.$name.log"
    rc=$?
    rm -rf "$save.warmup"
  fi
  if [[ $rc -eq 0 ]]; then
    train "$save" "$updates" "$workdir/train.$name.log"
    rc=$?
  else
    cp "$workdir/warmup.$name.log" "$workdir/train.$name.log"
  fi
  set -e
  if [[ $rc -ne 0 ]]; then
    echo "   fairseq-train failed ($rc):"; tail -15 "$workdir/train.$name.log"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tag" nan nan nan nan "$round" >> "$results"; return 0
  fi
  echo "-- $name: generating (beam 5)"
  set +e
  env "${env_backend[@]}" "${cmd_generate[@]}" "$data" "${lang_flags[@]}" --user-dir "$root/grnn_fairseq" \
    "${device_flags[@]}" --task translation --path "$save/checkpoint_last.pt" \
    --gen-subset test --beam 5 --max-tokens "$max_tokens" --num-workers 0 \
    "${length_flags[@]}" $gen_args > "$workdir/generate.$name.log" 2>&1
  rc=$?
  set -e
  if [[ $rc -ne 0 ]]; then
    echo "   fairseq-generate failed ($rc):"; tail -15 "$workdir/generate.$name.log"
  fi
  printf '%s\t%s\t%s\n' "$tag" "$(parse "$workdir/train.$name.log" "$workdir/generate.$name.log" | tr ' ' '\t')" "$round" >> "$results"
}

cases=()  # "arch backend", fairseq's own models with backend "-"
for arch in $models; do
  case "$arch" in
    lstm_*) cases+=("$arch -") ;;
    *)      for backend in $backends; do cases+=("$arch $backend"); done ;;
  esac
done
for ((round = 1; round <= rounds; round++)); do
  order=("${cases[@]}")
  if (( round % 2 == 0 )); then  # A B, B A, ...: a slow drift of the machine hits all alike
    order=()
    for ((i = ${#cases[@]} - 1; i >= 0; i--)); do order+=("${cases[i]}"); done
  fi
  if [[ $rounds -gt 1 ]]; then echo "== round $round of $rounds"; fi
  for case_ in "${order[@]}"; do
    run_case ${case_} "$round"
  done
done

echo
"$py" - "$results" "${backends%% *}" <<'EOF'
import math, statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
first = sys.argv[2]  # the first of --backends
tags = list(dict.fromkeys(r[0] for r in rows))  # first-seen order: the order of --models
rounds = max((int(r[5]) for r in rows), default=1)


def median(values):  # of the rounds that gave a figure; nan if none did
    values = [v for v in map(float, values) if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


# each model's median over the rounds, rounded as printed (the ratios use what the table
# shows): train wps, wpb, gen tok/s, gen sent/s
figures = {t: [round(median(r[i] for r in rows if r[0] == t), d)
               for i, d in ((1, 1), (2, 1), (3, 2), (4, 2))] for t in tags}
print(f"{'model':<40s} {'train tok/s':>14s} {'wpb':>10s} {'gen tok/s':>14s} {'gen sent/s':>12s}")
for tag, (wps, wpb, gtok, gsent) in figures.items():
    print(f"{tag:<40s} {wps:>14.1f} {wpb:>10.1f} {gtok:>14.2f} {gsent:>12.2f}")
if rounds > 1:
    print(f"(the median of {rounds} rounds, the models in turn, in reverse order every other "
          "round; each round's train / gen tok/s:)")
    for tag in tags:
        print(f"  {tag}: " + ", ".join(f"{r[1]} / {r[3]}" for r in rows if r[0] == tag))
print("(train tok/s: median of the log's wps over the intervals after the first)")

# ratios: each of our models against the models of the same sizes (by the name) that ran
K1 = {"wmt": "rnnsearch_wmt_en_de", "gigaword": "rnnsearch_gigaword", "iwslt": "rnnsearch"}


def family(arch):
    return next((f for f in ("wmt", "gigaword") if f in arch), "iwslt")


def ratio(a, b):
    return f"{a / b:.2f}x" if a > 0 and b > 0 else "-"  # nan compares false: "-"


out = []
for tag in tags:
    if tag.startswith("lstm"):  # fairseq's own models are references only
        continue
    arch, _, backend = tag.partition(".")
    refs = []
    if backend != first and f"{arch}.{first}" in figures:
        refs.append(f"{arch}.{first}")  # the same model on the first backend
    refs += [t for t in tags if t.startswith("lstm") and family(t) == family(arch)][:1]
    k1 = K1[family(arch)]
    if arch != k1:
        refs += [t for t in (f"{k1}.{backend}", f"{k1}.{first}") if t in figures][:1]
    for ref in refs:
        out.append(f"  {tag:40s} {ref:40s} {ratio(figures[tag][0], figures[ref][0]):>8s}"
                   f" {ratio(figures[tag][2], figures[ref][2]):>8s}")
if out:
    print("ratios: the model's tok/s over the reference's (above 1: faster), against the models\n"
          "of the same sizes: fairseq's own, our K=1, the same model on the first backend")
    print(f"  {'model':40s} {'reference':40s} {'train':>8s} {'gen':>8s}")
    print("\n".join(out))
EOF
echo "(each model's log intervals, wps; the first is left out of the median)"
while IFS=$'\t' read -r tag _ _ _ _ round; do
  name="$tag"; [[ $rounds -gt 1 ]] && name="$tag.r$round"
  echo "  $name: $(grep -o '\bwps=[0-9.]*' "$workdir/train.$name.log" | cut -d= -f2 | tr '\n' ' ')"
done < "$results"
[[ $keep -eq 1 ]] && echo "(logs and checkpoints in $workdir)"
[[ $keep -eq 1 ]] || echo "(temp dir removed at exit; pass --workdir DIR to keep logs and checkpoints)"
