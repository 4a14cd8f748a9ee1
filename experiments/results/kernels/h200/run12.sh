# Session 6, device call 2 (one H200): per-dimension GLA with every stage a Pallas kernel (the
# intra-chunk scores and their VJP too: `_scores_kernel`, `_scores_grad_kernel`), after run 11
# showed the XLA-built scores taking most of its 9.2 ms. Agreement of every fused op, per-dim
# stages, the fused ops at the defaults (the cumsum-once change), then per-dim GLA with fla in
# one process at 8x2048x16x128 and the Rodimus shape. Run from the repository root with .whl/, $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 100 python3 experiments/gpu_check_fused.py --out $OUT/check --skip-bench --check-impls fused > $OUT/check_log.txt 2>&1
timeout 60 python3 experiments/gpu_check_fused.py --out $OUT/stages --skip-check --skip-bench --stages '[{}]' \
  --stages-ops gla > $OUT/stages_log.txt 2>&1
timeout 90 python3 experiments/gpu_check_fused.py --out $OUT/sweep --skip-check --skip-bench \
  --cases 'delta:fused;delta_gated:fused;gla_scalar:fused;gla:fused' --shapes 8x2048x16x128,8x2048x1x64x2048,1x32768x16x128 \
  --sweep '[{}]' > $OUT/sweep_log.txt 2>&1
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 300 python3 experiments/gpu_check_fused.py --out $OUT/bench --skip-check \
  --cases 'gla:fused,fla' --shapes 8x2048x16x128,8x2048x1x64x2048 > $OUT/bench_log.txt 2>&1
for f in $OUT/*_log.txt; do echo "== $f"; grep '^{' "$f" | cut -c1-330; done
