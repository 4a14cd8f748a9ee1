# Prepared in session 9 (no device time left), not yet run. One H200 call, ~3 min: where the
# device time goes (experiments/profile_ops.py: per-kernel totals from a jax.profiler trace) in
#   gla          per-dim GLA fused fwd+bwd, 8x2048x16x128 (run 19: 3.51-3.57 ms; fla 3.70; the
#                5x-the-chunk-path target needs <= 3.03)
#   delta        the delta rule likewise (runs 8-9: 1.78-1.85 ms)
#   moe_tokamax  the MoE layer, rmoe-paper shape (H100: 4.88 ms, of which the two ragged dots with
#   moe_xla      the SwiGLU between them 3.51, the ragged dots alone 1.51 + 0.85: 1.15 ms unexplained)
# Carry: .whl.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 400 python3 experiments/profile_ops.py --out $OUT --iters 10 --top 30 2>&1 | tee $OUT/profile_log.txt | cut -c1-160
