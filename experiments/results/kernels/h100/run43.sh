# Session 16, chained after run 42 on the same warm H100. Carry: .whl, .triton_autotune.tgz.
# Issue 12's closing note says where the remaining time goes: per-kernel device time (jax.profiler trace)
# of the default Pallas path (impl="pallas", the dispatch: Mosaic GPU for the delta rule on an H100,
# Triton for per-dim GLA) at 8x2048x16x128 bf16, fwd+bwd with the output kept live.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
timeout 240 python3 experiments/profile_ops.py --targets delta_default,gla_default --iters 20 --top 12 --out $OUT \
  2>&1 | grep -v "Autotuning cache miss" > $OUT/log.txt
rm -f $OUT/hlo_*.txt
grep -E "^==|ms " $OUT/log.txt | cut -c1-200; tail -n 2 $OUT/log.txt | cut -c1-300
