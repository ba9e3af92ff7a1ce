# block-size sweep of the Triton kernels (ad hoc tuning run)
for cfg in 32,32,64,4 16,16,64,4 16,32,64,4 32,16,64,4 64,32,64,4 32,32,128,4 32,32,64,8 16,16,128,2 64,64,64,8; do
  echo "== GRNN_TRITON_BLOCKS=$cfg"
  GRNN_TRITON_BLOCKS=$cfg timeout 60 python3 scripts/bench_layer.py --device cuda --backend triton --groups 1,4,16 --rearrangement time --modes train,infer,decode --reps 10 --warmup 2 2>&1 | grep -E "^(train|infer|decode) |Error|error"
done
