# Session 14, call 5 (H100, warm), SCORES_DIAGONAL_MATMUL = True: anchor 5 (GLA 1x32768x16x128).
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache; mkdir -p $OUT/k
timeout 95 python3 experiments/bench_kernels.py --anchors 5 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
