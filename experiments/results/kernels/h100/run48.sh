# Session 17 (issue 12), after run 47: the per-dim GLA Mosaic GPU chunk-gradient kernel forms dg
# itself (db's in-chunk reverse cumulative sum as U db on the tensor cores, db in three bf16 parts),
# replacing XLA's reverse cumsum + convert (0.161 ms of run 47's 2.209 ms device time).
#   1. Device-time profile at 8x2048x16x128 fwd+bwd with ptxas's report (run 47's, the baseline: 2.209
#      ms; run 46's loop-s1 profiled 2.619 there and 2.610 in run 47, on two machines).
#   2. Agreement at 1x1024x4x128, fwd / fwd+bwd ms beside Triton at anchors 3 and 4 (mosaic_check,
#      one process). Cut to these after a failed start left 373 s of device time. Carry: .whl.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PALLAS_KERNELS_GPU=mosaic_gpu
mkdir -p $OUT/c
MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python3 -c "
from experiments import profile_ops
profile_ops.profile('gla_default', False, 20, 8)
" > $OUT/log_profile.txt 2>&1
grep -E " ms " $OUT/log_profile.txt | cut -c1-110 | head -9
grep -oE "[0-9]+ bytes stack frame, [0-9]+ bytes spill stores|Used [0-9]+ registers|entry function '[a-z_]+'" \
  $OUT/log_profile.txt | paste - - - | cut -c1-160
timeout 150 python3 experiments/mosaic_check.py --out $OUT/c --ops gla_perdim --backends triton,mosaic_gpu \
  --shape 8x2048x16x128,2x8192x16x128 2>&1 | grep -v "^E12\|onstant\|^$" > $OUT/c/log.txt
grep -h '^{' $OUT/c/log.txt | cut -c1-330; tail -n 2 $OUT/c/log.txt | cut -c1-300
