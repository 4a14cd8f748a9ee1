# Session 7, device call 2 (one H200): per-dimension GLA's score kernels with a program per
# 16-row block (`_scores_kernel` grid (B*H, N, C/16), `_scores_grad_kernel` (B*H, N*C/16, K/BK)):
# the diagonal block's column loop is serial, so one program per chunk ran 4 of them one after
# another (ptxas: scores 255 registers, spills gone; scores grad 254 -> 163 registers).
# Agreement of every fused op, per-dim against the XLA chunk path in one process, the other
# shapes, warps of the two score kernels, the stages; then fla with run 15's autotune cache.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
timeout 100 python3 experiments/gpu_check_fused.py --out $OUT/check --skip-bench --check-impls fused > $OUT/check_log.txt 2>&1
timeout 60 python3 experiments/gpu_check_fused.py --out $OUT/bench --skip-check --cases 'gla:chunk,fused' \
  --shapes 8x2048x16x128 > $OUT/bench_log.txt 2>&1
timeout 75 python3 experiments/gpu_check_fused.py --out $OUT/sweep --skip-check --skip-bench --cases 'gla:fused' \
  --shapes 8x2048x1x64x2048,2x8192x16x128,1x32768x16x128 --sweep '[{}]' > $OUT/sweep_log.txt 2>&1
timeout 60 python3 experiments/gpu_check_fused.py --out $OUT/warps --skip-check --skip-bench --cases 'gla:fused' \
  --shapes 8x2048x16x128 --sweep '[{"SCORES_PARAMS": [8, 1]}, {"SCORES_PARAMS": [2, 1]}, {"SCORES_GRAD_PARAMS": [2, 1]}, {"SCORES_GRAD_PARAMS": [8, 1]}]' \
  > $OUT/warps_log.txt 2>&1
timeout 35 python3 experiments/gpu_check_fused.py --out $OUT/stages --skip-check --skip-bench --stages '[{}]' \
  --stages-ops gla > $OUT/stages_log.txt 2>&1
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout ${FLA_LIMIT:-170} python3 experiments/gpu_check_fused.py --out $OUT/fla \
  --skip-check --cases 'gla:fused,fla' --shapes 8x2048x16x128,8x2048x1x64x2048 > $OUT/fla_log.txt 2>&1
for f in $OUT/*_log.txt; do echo "== $f"; grep '^{' "$f" | cut -c1-260; done
