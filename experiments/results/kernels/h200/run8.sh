# Session 5, device call 2 (one H200): the new defaults (T stored, bf16 gradient operands, 4-warp
# gradient kernels, SPLIT_OUTPUT "auto"), the split at 2x8192, the stages, then the anchors with
# flash-linear-attention in the same process. Run from the repository root with .whl/ and $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import jax; d = jax.devices()[0]; print(d, 'core_count', getattr(d, 'core_count', None))" > $OUT/device.txt 2>&1
# 1. auto vs forced split and 2-stage gradient kernels at 8x2048 and 2x8192; the stages at 8x2048
timeout 170 python3 experiments/gpu_check_fused.py --out $OUT/sweep --skip-check --skip-bench \
  --cases 'delta:fused;gla_scalar:fused' --shapes 8x2048x16x128,2x8192x16x128 \
  --sweep '[{}, {"SPLIT_OUTPUT": true}, {"SPLIT_OUTPUT": false}, {"DQK_PARAMS": [4, 2], "WY_GRAD_PARAMS": [4, 2]}]' \
  --stages '[{}]' > $OUT/sweep_log.txt 2>&1
# 2. the anchors, ours and fla's side by side (fla's backward refuses the gated delta rule and
#    simple GLA on Triton 3.6 Hopper, so those have its forward only)
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 330 python3 experiments/gpu_check_fused.py --out $OUT/anchors --skip-check \
  --cases 'delta:fused,fla;delta_gated:fused;gla_scalar:fused,fla' \
  --shapes 8x2048x16x128,2x8192x16x128,1x32768x16x128 > $OUT/anchors_log.txt 2>&1
cat $OUT/device.txt
for f in $OUT/*_log.txt; do echo "== $f"; tail -n 2 "$f" | cut -c1-300; done
