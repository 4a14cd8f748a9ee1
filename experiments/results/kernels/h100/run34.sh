# Session 13, call 3 (held to 230 s: 431 s of device time left). Carry: .whl, .triton_autotune.tgz.
# Issue 12: the Mosaic GPU fused GLA forward+backward (scalar and no decay) and the fused Mosaic GPU
# delta-rule forward, first on a GPU: agreement and time against the Triton fused kernels and fla.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/c
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $((225 - SECONDS)) python3 experiments/mosaic_check.py --out $OUT/c 2>&1 | grep -v "Autotuning cache miss" > $OUT/c/log.txt
echo "== done at $SECONDS s"
cut -c1-700 $OUT/c/log.txt | tail -n 30
