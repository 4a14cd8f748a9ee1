# Prepared in session 14 for the next H100 call (held to 575 s). Carry: .whl, .triton_autotune.tgz.
# 1. Issue 12: mosaic_check.py with the delta rule at the op level: fwd and fwd+bwd under
#    PALLAS_KERNELS_GPU=triton / auto / mosaic_gpu (the fused Mosaic GPU delta-rule backward's first
#    timing, with and without PRESOLVE: the chunk-parallel solve), agreement with the float32 scan;
#    scalar GLA again with fla's chunk_simple_gla beside it.
# 2. Issue 12's 1.0x target at the delta rule's 1x32768 anchor (1.16x fla in run 35): the Triton
#    state passes with 32-wide value blocks (64 sequential programs instead of 32 on 132 SMs).
# 3. Issue 3: the agreement of the new per-dim GLA diagonal path at check shapes 3 and 4 (1x8192x4x128
#    and Rodimus), then the Rodimus anchor.
lim() { local left=$((575 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/c $OUT/s $OUT/k
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $(lim 320) python3 experiments/mosaic_check.py --out $OUT/c --ops delta,delta_gated,gla_scalar 2>&1 \
  | grep -v "Autotuning cache miss" | grep -v "^E1207\|onstant\|^$" > $OUT/c/log.txt
echo "== mosaic_check done at $SECONDS s"
timeout $(lim 110) python3 experiments/gpu_check_fused.py --skip-check --skip-bench --cases delta:fused \
  --shapes 1x32768x16x128 --out $OUT/s --sweep '[{}, {"STATE_BLOCK_V": 32}, {}, {"STATE_BLOCK_V": 32}]' 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/s/log.txt
echo "== sweep done at $SECONDS s"
timeout $(lim 600) python3 experiments/bench_kernels.py --check --check-shapes 3,4 --anchors 6 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
echo "== all done at $SECONDS s"
grep '^{' $OUT/c/log.txt | cut -c1-400; grep '^{' $OUT/s/log.txt | cut -c1-300
grep -E "^check|^\||Error" $OUT/k/log.txt | cut -c1-300
