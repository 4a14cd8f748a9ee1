# Session 13, call 1 (H100, held to 575 s). Carry: .whl, .triton_autotune.tgz (run 17's).
# 1. Issue 12: the first on-GPU check of the fused Mosaic GPU GLA forward (jax 0.11.2) against the
#    Triton fused forward, 8x2048x16x128 bf16, with and without stored states.
# 2. Issue 3 on the H100: bench_kernels.py --check (every check shape), then every anchor, GLA 8x2048
#    first (the 5x-over-chunk target it missed on the H200); the JSON is rewritten after each anchor.
lim() { local left=$((575 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/k $OUT/mf
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $(lim 80) python3 experiments/gpu_check_fused.py --out $OUT/mf --skip-check --skip-bench --mosaic-fused \
  --shapes 8x2048x16x128 2>&1 | grep -v "Autotuning cache miss" > $OUT/mf/log.txt
echo "== mosaic fused done at $SECONDS s"
timeout $(lim 600) python3 experiments/bench_kernels.py --check --anchors 3,6,0,4,1,5,2 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
echo "== all done at $SECONDS s"
grep -E '^\{' $OUT/mf/log.txt | cut -c1-400; tail -n 3 $OUT/mf/log.txt | cut -c1-600
grep -E "^check|^\||Error" $OUT/k/log.txt | cut -c1-260
