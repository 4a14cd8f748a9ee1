# Session 16 (issue 12): the per-dim GLA Mosaic GPU kernels with fewer live registers (q, k and b read
# from shared memory at each unrolled level instead of held through all six; the index arrays made at
# each use; dQ's state term as the level accumulator's start, dK's state terms after the levels).
# ptxas's register and spill report for every Mosaic GPU kernel (MOSAIC_GPU_DUMP_PTXAS), the device-
# time profile (as run 44: chunk_grad 6.62 ms, scores 0.81 before), then the agreement at 1x1024x4x128
# and the timing at 8x2048x16x128 on the Mosaic GPU kernels alone. Carry: .whl.
# Also one buffer slot for the chunk-parallel kernels (two programs an SM) against two.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PALLAS_KERNELS_GPU=mosaic_gpu
mkdir -p $OUT/c
# Both buffer-slot settings of the chunk-parallel kernels (CHUNK_PARALLEL_SLOTS) in one process.
MOSAIC_GPU_DUMP_PTXAS=1 timeout 180 python3 -c "
from experiments import profile_ops
from pallas_kernels.common import gla_perdim_kernels_mosaic_gpu as m
for slots in (2, 1):
  m.CHUNK_PARALLEL_SLOTS = slots
  print('== CHUNK_PARALLEL_SLOTS', slots, flush=True)
  profile_ops.profile('gla_default', False, 20, 8)
" > $OUT/log.txt 2>&1
grep -iE "ptxas|spill|registers|entry function" $OUT/log.txt | sort | uniq -c | cut -c1-220 | head -40
grep -E "^==|ms |CHUNK_PARALLEL" $OUT/log.txt | cut -c1-160
timeout 150 python3 experiments/mosaic_check.py --out $OUT/c --ops gla_perdim --backends mosaic_gpu 2>&1 \
  | grep -v "^E12\|onstant\|^$" > $OUT/c/log.txt
grep '^{' $OUT/c/log.txt | cut -c1-300; tail -n 2 $OUT/c/log.txt | cut -c1-300
