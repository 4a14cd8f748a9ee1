# Session 14, call 3 (H100, warm), with SCORES_DIAGONAL_MATMUL = True as the default (this commit):
# agreement at GLA check shape 2 (1x2048x16x128, float32 and bf16) and anchors 3 (GLA 8x2048) and 6 (Rodimus).
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache; mkdir -p $OUT/k
timeout 300 python3 experiments/bench_kernels.py --check --check-shapes 2 --anchors 3,6 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
