# Session 14, call 4 (H100, warm), SCORES_DIAGONAL_MATMUL = True: anchor 4 (GLA 2x8192x16x128).
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache; mkdir -p $OUT/k
timeout 125 python3 experiments/bench_kernels.py --anchors 4 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
