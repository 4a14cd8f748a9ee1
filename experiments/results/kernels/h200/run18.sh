# Session 7, device call 4 (one H200, ~180 s of budget): four versions of the per-dim score
# kernels, each in its own process at 8x2048x16x128 (fwd and fwd+bwd), after run 17's tiled
# scores kernel did not beat the per-chunk one (scores stage 1.57 against 1.21 ms, run 14):
#   v1  run 17 (commit 006ddd9): per-row-block programs, 16x16 tiles, column loop into a tile
#   v2  session 6's per-chunk `_scores_kernel` with the per-row-block `_scores_grad_kernel`
#   v3  v1 with each diagonal column stored straight to P (as fla's intra kernel), no tile insert
#   v4  v3 with exp2 in both diagonal loops (Pallas lowers jnp.exp to libdevice expf)
# .variants/vN.py replace pallas_kernels/common/chunk_kernels_triton.py in turn (git-ignored,
# carried; v4 is the working tree's file at this run).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
for v in v4 v2 v3 v1; do
  cp .variants/$v.py pallas_kernels/common/chunk_kernels_triton.py
  timeout 40 python3 experiments/gpu_check_fused.py --out /tmp/$v --skip-check --cases 'gla:fused' \
    --shapes 8x2048x16x128 2>&1 | grep '^{' | sed "s/^/$v /" | tee -a $OUT/variants_log.txt | cut -c1-200
done
