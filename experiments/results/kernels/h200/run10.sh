# Session 5, device call 4 (one H200): the in-chunk cumulative decay computed once in XLA instead
# of in every kernel (the gated ops), fewer warps for the WY and gradient kernels, and the
# agreement check of the session-5 defaults. Run from the repository root with .whl/ and $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 80 python3 experiments/gpu_check_fused.py --out $OUT/check --skip-bench --check-impls fused > $OUT/check_log.txt 2>&1
timeout 230 python3 experiments/gpu_check_fused.py --out $OUT/sweep --skip-check --skip-bench \
  --cases 'delta:fused;delta_gated:fused;gla_scalar:fused' --shapes 8x2048x16x128,1x32768x16x128 \
  --sweep '[{}, {"WY_PARAMS": [2, 1]}, {"DQK_PARAMS": [2, 1], "WY_GRAD_PARAMS": [2, 1]}]' > $OUT/sweep_log.txt 2>&1
for f in $OUT/*_log.txt; do echo "== $f"; tail -n 2 "$f" | cut -c1-300; done
