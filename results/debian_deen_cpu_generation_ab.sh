#!/bin/bash
# Generation speed of the De-En CPU pilot checkpoints, before and after the CPU decoding change,
# interleaved per model: OLD and NEW are checkouts of the two commits (here 2ac70f9 in /work/main
# and the change in /work/dev), ROOT the one holding data-bin/ and work/debian_deen/.
# One thread, beam 5, batch 128, the 736 test sentences. Usage: RUNS="k1 k4" bash $0
ROOT=${ROOT:-/work/main} OLD=${OLD:-/work/main} NEW=${NEW:-/work/dev}
source $ROOT/.venv/bin/activate
for rep in 1 2; do
for run in ${RUNS:-k1 k2 k4 k8 k16 restricted_r0.5 fairseq_lstm}; do
  for tree in main dev; do
    if [ $tree = main ]; then cd $OLD; else cd $NEW; fi
    line=$(OMP_NUM_THREADS=1 fairseq-generate $ROOT/data-bin/debian/deen/data-bin --user-dir grnn_fairseq \
      --path $ROOT/work/debian_deen/$run/seed1/averaged.pt --gen-subset test --beam 5 --batch-size 128 --quiet \
      --required-batch-size-multiple 1 --cpu --post-process sentencepiece --scoring sacrebleu 2>&1 | grep -E "Translated|BLEU" | tr '\n' ' ')
    echo "rep$rep $run $tree $(echo "$line" | grep -o 'in [0-9.]*s ([0-9.]* sentences/s, [0-9.]* tokens/s)') $(echo "$line" | grep -o 'BLEU = [0-9.]*')"
  done
done
done
