# Session 17 (issue 12), after run 46: the per-dim GLA Mosaic GPU chunk-gradient kernel with fewer
# values live through its level loop (dQ's level product consumed before dK's is formed; dK's last
# row from its accumulator start; db's last-row sum staged in shared memory), one buffer slot and
# the levels as a loop now the defaults.
#   1. Device-time profile at 8x2048x16x128 fwd+bwd and ptxas's report: run 46's loop-s1
#      (.variants/gla_perdim_run46.py) against this commit's kernels, each in its own process.
#   2. Agreement with the float32 scan at 1x1024x4x128 and at the Rodimus check shape 1x2048x1x64x2048,
#      and fwd / fwd+bwd ms beside Triton at the four per-dim GLA anchors (mosaic_check, one process).
# Carry: .whl, .variants.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PALLAS_KERNELS_GPU=mosaic_gpu
mkdir -p $OUT/c $OUT/r
m=pallas_kernels/common/gla_perdim_kernels_mosaic_gpu.py
profile() {  # name, module settings
  MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python3 -c "
from experiments import profile_ops
from pallas_kernels.common import gla_perdim_kernels_mosaic_gpu as m
$2
profile_ops.profile('gla_default', False, 20, 6)
" > $OUT/log_$1.txt 2>&1
  echo "== $1: exit $?"; grep -E " ms " $OUT/log_$1.txt | cut -c1-110 | head -7
  grep -oE "[0-9]+ bytes stack frame, [0-9]+ bytes spill stores|Used [0-9]+ registers|entry function '[a-z_]+'" \
    $OUT/log_$1.txt | paste - - - | cut -c1-160
}
cp $m /tmp/new.py
cp .variants/gla_perdim_run46.py $m
profile run46-loop-s1 "m.LEVEL_LOOP, m.CHUNK_PARALLEL_SLOTS = True, 1"
cp /tmp/new.py $m
profile run47 ""
timeout 240 python3 experiments/mosaic_check.py --out $OUT/c --ops gla_perdim --backends triton,mosaic_gpu \
  --shape 8x2048x16x128,2x8192x16x128,1x32768x16x128,8x2048x1x64x2048 2>&1 | grep -v "^E12\|onstant\|^$" > $OUT/c/log.txt
timeout 90 python3 experiments/mosaic_check.py --out $OUT/r --ops gla_perdim --backends mosaic_gpu \
  --check-shape 1x2048x1x64x2048 --shape none 2>&1 | grep -v "^E12\|onstant\|^$" > $OUT/r/log.txt
grep -h '^{' $OUT/c/log.txt $OUT/r/log.txt | cut -c1-330; tail -n 2 $OUT/c/log.txt $OUT/r/log.txt | cut -c1-300
