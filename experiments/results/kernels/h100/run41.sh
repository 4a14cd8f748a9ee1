# Session 15: the delta rule's anchors under the new Hopper default (dispatch.MOSAIC_GPU_FASTER with
# the delta rule, delta_kernels_mosaic_gpu.PRESOLVE on; run 40: fwd+bwd 1.29 ms against Triton's 1.91
# at 8x2048), beside fla and the chunk form; then the three backends side by side at 1x32768.
# Carry: .whl, .triton_autotune.tgz.
lim() { local left=$((570 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/c $OUT/k
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $(lim 330) python3 experiments/bench_kernels.py --anchors 0,1,2 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
echo "== bench done at $SECONDS s"
timeout $(lim 600) python3 experiments/mosaic_check.py --out $OUT/c --ops delta --shape 1x32768x16x128 2>&1 \
  | grep -v "Autotuning cache miss" | grep -v "^E12\|onstant\|^$" > $OUT/c/log.txt
echo "== all done at $SECONDS s"
grep -E "^\||Error" $OUT/k/log.txt | cut -c1-260; grep '^{' $OUT/c/log.txt | cut -c1-300; tail -n 3 $OUT/c/log.txt | cut -c1-300
