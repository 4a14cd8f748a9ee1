# Session 17 (issue 12): the per-dim GLA Mosaic GPU kernels' register pressure and code size.
# Variants, each profiled in its own process (device time per kernel, as run 44: chunk_grad 6.62 ms,
# scores 0.81 before) with ptxas's register/spill report and the SASS instruction count per kernel:
#   head      session 16's kernels (.variants/gla_perdim_head.py, commit 06ce7e3), two buffer slots
#   new-s2    dK's state term and db's last-row sum formed before the levels, dP held in bf16 (fewer
#             values live through the levels), unrolled levels, two slots
#   new-s1    the same, one slot (two programs an SM where registers allow)
#   loop-s2   the same as new-s2, the levels a loop (LEVEL_LOOP: one level's code, not six)
#   loop-s1   loop, one slot
# Then, for the variant of least device time, agreement at 1x1024x4x128 and timing at 8x2048x16x128
# beside Triton (mosaic_check, one process). Carry: .whl, .variants.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PALLAS_KERNELS_GPU=mosaic_gpu MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1
mkdir -p $OUT/c
m=pallas_kernels/common/gla_perdim_kernels_mosaic_gpu.py
profile() {  # name, slots, loop
  MOSAIC_GPU_DUMP_TO=/tmp/dump/$1 timeout 120 python3 -c "
from experiments import profile_ops
from pallas_kernels.common import gla_perdim_kernels_mosaic_gpu as m
m.CHUNK_PARALLEL_SLOTS = $2
if $3: m.LEVEL_LOOP = True
profile_ops.profile('gla_default', False, 20, 6)
" > /tmp/log_$1.txt 2>&1
  echo "== $1: exit $?"; grep -E " ms " /tmp/log_$1.txt | cut -c1-120 | head -8
  for f in /tmp/dump/$1/*; do   # the SASS instruction lines per dumped file
    echo "$(basename $f | cut -c1-90) $(stat -c %s $f) bytes, $(grep -cE '^\s+/\*[0-9a-f]{4,}\*/' $f) SASS lines"
  done | head -20
  grep -rhiE "registers|spill|bytes stack" /tmp/dump/$1 /tmp/log_$1.txt 2>/dev/null | sort | uniq -c | cut -c1-200 | head -24
}
cp $m /tmp/new.py
cp .variants/gla_perdim_head.py $m
profile head 2 False
cp /tmp/new.py $m
profile new-s2 2 False
profile new-s1 1 False
profile loop-s2 2 True
profile loop-s1 1 True
tar -C /tmp -czf $OUT/dumps.tgz dump log_head.txt log_new-s2.txt log_new-s1.txt log_loop-s2.txt log_loop-s1.txt 2>/dev/null
ls -la $OUT/dumps.tgz
# The variant of least device time (the profile's per-call total), then beside Triton (fla's chunk_gla
# was 4.09 ms in run 42; without its autotune cache its tuning would not fit this call).
best=$(for v in new-s2 new-s1 loop-s2 loop-s1; do
  t=$(grep -oE "[0-9.]+ ms per call" /tmp/log_$v.txt | head -1 | cut -d' ' -f1); [ -n "$t" ] && echo "$t $v"
done | sort -n | head -1 | cut -d' ' -f2)
echo "== best: $best"
slots=${best#*-s}; loop=$([ "${best%%-*}" = loop ] && echo True || echo False)
timeout 200 python3 -c "
from experiments import mosaic_check
from pallas_kernels.common import gla_perdim_kernels_mosaic_gpu as m
m.CHUNK_PARALLEL_SLOTS, m.LEVEL_LOOP = ${slots:-2}, ${loop:-False}
mosaic_check.main(['--out', '$OUT/c', '--ops', 'gla_perdim', '--backends', 'triton,mosaic_gpu'])
" 2>&1 | grep -v "^E12\|onstant\|^$" > $OUT/c/log.txt
grep '^{' $OUT/c/log.txt | cut -c1-300; tail -n 2 $OUT/c/log.txt | cut -c1-300
