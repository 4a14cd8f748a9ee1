# Session 6, device call 3 (one H200): per-dimension GLA after run 12 (4.59 ms fwd+bwd at
# 8x2048x16x128): the sequential passes read e * Q, d * K and lambda stored by `_scores_kernel`
# (no exp in their serial loops), and the score kernels' diagonal columns 4 to a loop step
# (SCORE_UNROLL; 1 was run 12). Agreement of every fused op, per-dim stages, per-dim fwd+bwd at the
# four anchors and the unroll A/B. fla's chunk_gla is left out: it did not finish inside 300-330 s
# in runs 11 and 12. Run from the repository root with .whl/ and $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 100 python3 experiments/gpu_check_fused.py --out $OUT/check --skip-bench --check-impls fused > $OUT/check_log.txt 2>&1
timeout 60 python3 experiments/gpu_check_fused.py --out $OUT/stages --skip-check --skip-bench --stages '[{}]' \
  --stages-ops gla > $OUT/stages_log.txt 2>&1
timeout 170 python3 experiments/gpu_check_fused.py --out $OUT/sweep --skip-check --skip-bench --cases 'gla:fused' \
  --shapes 8x2048x16x128,8x2048x1x64x2048,2x8192x16x128,1x32768x16x128 --sweep '[{}]' > $OUT/sweep_log.txt 2>&1
timeout 60 python3 experiments/gpu_check_fused.py --out $OUT/unroll --skip-check --skip-bench --cases 'gla:fused' \
  --shapes 8x2048x16x128 --sweep '[{"SCORE_UNROLL": 1}]' > $OUT/unroll_log.txt 2>&1
for f in $OUT/*_log.txt; do echo "== $f"; grep '^{' "$f" | cut -c1-200; done
