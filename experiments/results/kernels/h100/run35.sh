# Session 14, call 1 (H100, held to 575 s). Carry: .whl, .triton_autotune.tgz.
# 1. Issue 12: mosaic_check.py: scalar / no-decay GLA under PALLAS_KERNELS_GPU=triton, =auto (the
#    Mosaic GPU forward, the Triton backward: the session-13 default) and =mosaic_gpu (the fused
#    Mosaic GPU backward too), agreement with the float32 scan and fwd / fwd+bwd ms; the fused
#    Mosaic GPU delta-rule forward against the Triton one.
# 2. Issue 3: bench_kernels.py at the anchors run 32 left (delta rule 8x2048 with fla's fwd+bwd,
#    2x8192 and 1x32768 for both ops); the check already ran in run 32.
lim() { local left=$((575 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/c $OUT/k
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $(lim 170) python3 experiments/mosaic_check.py --out $OUT/c 2>&1 | grep -v "Autotuning cache miss" > $OUT/c/log.txt
echo "== mosaic_check done at $SECONDS s"
timeout $(lim 600) python3 experiments/bench_kernels.py --anchors 0,4,1,5,2 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
echo "== all done at $SECONDS s"
cut -c1-600 $OUT/c/log.txt | grep '^{'; tail -n 3 $OUT/c/log.txt | cut -c1-600
grep -E "^\||Error" $OUT/k/log.txt | cut -c1-260
