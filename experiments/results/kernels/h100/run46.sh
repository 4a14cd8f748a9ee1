# Session 16 (issue 12): the per-dim GLA Mosaic GPU kernels with fewer live registers (q, k and b read
# from shared memory at each unrolled level instead of held through all six; the index arrays made at
# each use; dQ's state term as the level accumulator's start, dK's state terms after the levels).
# ptxas's register and spill report for every Mosaic GPU kernel (MOSAIC_GPU_DUMP_PTXAS), the device-
# time profile (as run 44: chunk_grad 6.62 ms, scores 0.81 before), then the agreement at 1x1024x4x128
# and the timing at 8x2048x16x128 on the Mosaic GPU kernels alone. Carry: .whl.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PALLAS_KERNELS_GPU=mosaic_gpu
mkdir -p $OUT/c
MOSAIC_GPU_DUMP_PTXAS=1 timeout 150 python3 experiments/profile_ops.py --targets gla_default --iters 20 --top 8 \
  --out $OUT > $OUT/log.txt 2>&1
rm -f $OUT/hlo_*.txt
grep -iE "ptxas|spill|registers|entry function" $OUT/log.txt | sort | uniq -c | cut -c1-220 | head -40
grep -E "^==|ms " $OUT/log.txt | cut -c1-160
timeout 150 python3 experiments/mosaic_check.py --out $OUT/c --ops gla_perdim --backends mosaic_gpu 2>&1 \
  | grep -v "^E12\|onstant\|^$" > $OUT/c/log.txt
grep '^{' $OUT/c/log.txt | cut -c1-300; tail -n 2 $OUT/c/log.txt | cut -c1-300
