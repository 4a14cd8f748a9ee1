# Session 6, device call 4 (one H200, ~4 minutes of budget left): per-dimension GLA at the new
# defaults (SCORE_UNROLL 1, after run 13's 4.12 against 4.74 ms), against the XLA chunk path in
# the same process at 8x2048x16x128, fused alone at the other anchors and the Rodimus shape; then
# fewer warps for the two score kernels (latency-bound), and the stages.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 60 python3 experiments/gpu_check_fused.py --out $OUT/bench --skip-check --cases 'gla:chunk,fused' \
  --shapes 8x2048x16x128 > $OUT/bench_log.txt 2>&1
timeout 75 python3 experiments/gpu_check_fused.py --out $OUT/sweep --skip-check --skip-bench --cases 'gla:fused' \
  --shapes 8x2048x1x64x2048,2x8192x16x128,1x32768x16x128 --sweep '[{}]' > $OUT/sweep_log.txt 2>&1
timeout 45 python3 experiments/gpu_check_fused.py --out $OUT/warps --skip-check --skip-bench --cases 'gla:fused' \
  --shapes 8x2048x16x128 --sweep '[{"SCORES_PARAMS": [2, 1], "SCORES_GRAD_PARAMS": [2, 1]}]' > $OUT/warps_log.txt 2>&1
timeout 35 python3 experiments/gpu_check_fused.py --out $OUT/stages --skip-check --skip-bench --stages '[{}]' \
  --stages-ops gla > $OUT/stages_log.txt 2>&1
for f in $OUT/*_log.txt; do echo "== $f"; grep '^{' "$f" | cut -c1-260; done
