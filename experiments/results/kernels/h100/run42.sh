# Prepared in session 15 for the next H100 call (held to 560 s). Carry: .whl, .triton_autotune.tgz.
# 1. Issue 12: the fused Mosaic GPU per-dimension GLA (gla_perdim_kernels_mosaic_gpu) on a GPU for the
#    first time: mosaic_check.py --ops gla_perdim,gla_scalar (agreement with the float32 scan at
#    1x1024x4x128, fwd and fwd+bwd at 8x2048x16x128 under =triton / =auto / =mosaic_gpu, fla's chunk_gla
#    and chunk_simple_gla beside).
# 2. Issue 12: the Mosaic GPU kernels' agreement at the benchmark's check shapes (PALLAS_KERNELS_GPU=
#    mosaic_gpu; bf16 rows run Mosaic GPU, float32 ones Triton, which Mosaic GPU does not take), then
#    per-dim GLA anchors 3 and 6 (8x2048x16x128, Rodimus) on the Mosaic GPU kernels beside fla.
lim() { local left=$((560 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/c $OUT/k
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $(lim 260) python3 experiments/mosaic_check.py --out $OUT/c --ops gla_perdim,gla_scalar 2>&1 \
  | grep -v "Autotuning cache miss" | grep -v "^E12\|onstant\|^$" > $OUT/c/log.txt
echo "== mosaic_check done at $SECONDS s"
PALLAS_KERNELS_GPU=mosaic_gpu timeout $(lim 600) python3 experiments/bench_kernels.py --check --anchors 3,6 \
  --out $OUT/k 2>&1 | grep -v "Autotuning cache miss" > $OUT/k/log.txt
echo "== all done at $SECONDS s"
grep '^{' $OUT/c/log.txt | cut -c1-300; tail -n 3 $OUT/c/log.txt | cut -c1-300
grep -E "^check|^\||Error" $OUT/k/log.txt | cut -c1-300
