# Session 5, device call 1 (one H200): the backward options STORE_T and BF16_GRAD_OPERANDS, the
# split passes and warps/stages, fused path only (no fla: its autotuning takes minutes a shape).
# Run from the repository root with the wheels in .whl/ and $OUT set.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
A='"STORE_T": true, "BF16_GRAD_OPERANDS": true'
# 0. agreement of the fused path with both options on, vs the float32 scan
timeout 80 python3 experiments/gpu_check_fused.py --out $OUT/check --skip-bench --check-impls fused \
  --params "{$A}" > $OUT/check_log.txt 2>&1
# 1. the long sequence (B*H = 16): the splits with the options, and the stages of 8x2048
timeout 200 python3 experiments/gpu_check_fused.py --out $OUT/long --skip-check --skip-bench \
  --cases 'delta:fused;gla_scalar:fused' --shapes 1x32768x16x128 \
  --sweep "[{}, {$A}, {$A, \"SPLIT_OUTPUT\": true}, {$A, \"SPLIT_STATE_GRAD\": true},
            {$A, \"SPLIT_OUTPUT\": true, \"SPLIT_STATE_GRAD\": true},
            {$A, \"FORWARD_PARAMS\": [8, 1], \"STATE_GRAD_PARAMS\": [8, 1]},
            {$A, \"SPLIT_OUTPUT\": true, \"SPLIT_STATE_GRAD\": true, \"FORWARD_PARAMS\": [8, 1], \"STATE_GRAD_PARAMS\": [8, 1]}]" \
  --stages "[{}, {$A}]" > $OUT/long_log.txt 2>&1
# 2. 8x2048: each option alone and together, then warps / stages on top
timeout 270 python3 experiments/gpu_check_fused.py --out $OUT/short --skip-check --skip-bench \
  --cases 'delta:fused;delta_gated:fused;gla_scalar:fused' --shapes 8x2048x16x128 \
  --sweep "[{}, {\"STORE_T\": true}, {\"BF16_GRAD_OPERANDS\": true}, {$A},
            {$A, \"DQK_PARAMS\": [4, 1]}, {$A, \"WY_GRAD_PARAMS\": [4, 1]},
            {$A, \"DQK_PARAMS\": [8, 2], \"WY_GRAD_PARAMS\": [8, 2]},
            {$A, \"FORWARD_PARAMS\": [8, 1], \"STATE_GRAD_PARAMS\": [8, 1]}, {$A, \"WY_PARAMS\": [8, 1]},
            {$A, \"SPLIT_OUTPUT\": true, \"SPLIT_STATE_GRAD\": true}]" > $OUT/short_log.txt 2>&1
for f in $OUT/*_log.txt; do echo "== $f"; tail -n 2 "$f" | cut -c1-400; done
