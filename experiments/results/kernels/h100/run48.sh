# Session 17 (issue 12), after run 47: the per-dim GLA Mosaic GPU chunk-gradient kernel forms dg
# itself (db's in-chunk reverse cumulative sum as U db on the tensor cores, db in three bf16 parts),
# replacing XLA's reverse cumsum + convert (0.161 ms of run 47's 2.209 ms device time), and the
# forward's in-chunk cumsum of g is a batched matmul by the lower-triangular ones (XLA's cumsum:
# 0.164 ms in run 47).
#   1. Device-time profiles at 8x2048x16x128 fwd+bwd with ptxas's report, in one process: this
#      commit, then with run 47's jnp.cumsum form of `chunk_cumsum` (run 47's total, the baseline:
#      2.209 ms; run 46's loop-s1 profiled 2.619 there and 2.610 in run 47, on two machines).
#   2. With the faster `chunk_cumsum`: agreement at 1x1024x4x128, fwd / fwd+bwd ms beside Triton at
#      the four per-dim GLA anchors (mosaic_check, one process), then agreement at the Rodimus check
#      shape. About 5 min. Carry: .whl.
# (Session 17 could not start it: two failed starts left 358 s, under what a start needs.)
# Carry: .whl, .variants (step 3).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PALLAS_KERNELS_GPU=mosaic_gpu
mkdir -p $OUT/c $OUT/r
cat > /tmp/cumsum_forms.py <<'PY'
import jax.numpy as jnp
from pallas_kernels.common import gla_perdim_kernels_mosaic_gpu as m
matmul_form = m.chunk_cumsum
def scan_form(g, chunk):   # run 47's chunk_cumsum
  b, t, h, kd = g.shape
  return jnp.cumsum(g.astype(jnp.float32).reshape(b, t // chunk, chunk, h, kd), axis=2).reshape(g.shape)
PY
MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 -c "
import sys; sys.path.insert(0, '/tmp')
from experiments import profile_ops
import cumsum_forms as f
print('== chunk_cumsum: matmul')
profile_ops.profile('gla_default', False, 20, 8)
f.m.chunk_cumsum = f.scan_form
print('== chunk_cumsum: jnp.cumsum')
profile_ops.profile('gla_default', False, 20, 8)
" > $OUT/log_profile.txt 2>&1
# 3. The same profile, matmul chunk_cumsum, with the scores kernel of before session 18 (.variants/r47regs
#    holds pallas_kernels of 6da45e1): this commit's scores kernel builds its level masks from
#    [C] index vectors and reads q, k, b from shared memory where used, 255 -> 208 registers by
#    experiments/mosaic_ptxas_offline.py (chunk_grad 255 either way, spills 16 -> 12 B).
R=$PWD
(cd /tmp && PYTHONPATH=/tmp/site:$R/.variants/r47regs:$R MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 -c "
import pallas_kernels   # first: profile_ops puts the repository first on sys.path
from experiments import profile_ops
from pallas_kernels.common import gla_perdim_kernels_mosaic_gpu as m
print('== kernels from', m.__file__)
profile_ops.profile('gla_default', False, 20, 8)
") > $OUT/log_profile_r47regs.txt 2>&1
grep -E "^== | ms " $OUT/log_profile_r47regs.txt | cut -c1-110 | head -12
grep -E "^== | ms " $OUT/log_profile.txt | cut -c1-110 | head -22
grep -oE "[0-9]+ bytes stack frame, [0-9]+ bytes spill stores|Used [0-9]+ registers|entry function '[a-z_]+'" \
  $OUT/log_profile.txt | paste - - - | cut -c1-160
# One "ms per call" line per profile (the compute stream's track, as in run 47's log).
form=$(grep -oE "[0-9.]+ ms per call" $OUT/log_profile.txt | cut -d' ' -f1 | head -2 | paste - - | awk '{print ($1 <= $2) ? "matmul_form" : "scan_form"}')
echo "== mosaic_check with chunk_cumsum = ${form:=matmul_form}"
timeout 240 python3 -c "
import sys; sys.path.insert(0, '/tmp')
import cumsum_forms as f
from experiments import mosaic_check
f.m.chunk_cumsum = f.$form
mosaic_check.main(['--out', '$OUT/c', '--ops', 'gla_perdim', '--backends', 'triton,mosaic_gpu',
                   '--shape', '8x2048x16x128,2x8192x16x128,1x32768x16x128,8x2048x1x64x2048'])
" 2>&1 | grep -v "^E12\|onstant\|^$" > $OUT/c/log.txt
timeout 90 python3 experiments/mosaic_check.py --out $OUT/r --ops gla_perdim --backends mosaic_gpu \
  --check-shape 1x2048x1x64x2048 --shape none 2>&1 | grep -v "^E12\|onstant\|^$" > $OUT/r/log.txt
grep -h '^{' $OUT/c/log.txt $OUT/r/log.txt | cut -c1-330; tail -n 2 $OUT/c/log.txt $OUT/r/log.txt | cut -c1-300
