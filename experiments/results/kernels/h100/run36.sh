# Session 14, call 2 (H100, chained after run 35 on the warm machine; wheels already in /tmp/site).
# Issue 3: SCORES_DIAGONAL_MATMUL off / on / off / on (interleaved), per-dim GLA 8x2048x16x128 bf16.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache; mkdir -p $OUT
timeout 320 python3 experiments/gpu_check_fused.py --skip-check --skip-bench --cases gla:fused --out $OUT \
  --sweep '[{}, {"SCORES_DIAGONAL_MATMUL": true}, {}, {"SCORES_DIAGONAL_MATMUL": true}]'
