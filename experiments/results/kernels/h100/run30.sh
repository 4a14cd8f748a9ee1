# Session 12, call 1 (held to 100 s: ten failed starts left under 6 device minutes).
# Carry: .whl, .triton_autotune.tgz (run 17's fla autotune cache).
# 1. The MoE layer with session 12's Pallas kernels (pallas_kernels/moe/triton.py: the grouped
#    weight gradient walking each expert's rows, the token-row gather) against session 11's
#    library (tiled weight gradient, XLA gathers), each piece alone, and tokamax's own weight
#    gradient; every variant against a float32 jax.lax.ragged_dot reference.
# 2. bench_fastpaths moe: issue 11's numbers with the new defaults.
# 3. Issue 3 on this device: bench_kernels --check at GLA 8x2048 (the 5x-chunk question), then the
#    Rodimus shape (chunk, pallas, fla in one process).
lim() { local left=$((100 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/m $OUT/f $OUT/k
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $(lim 75) python3 experiments/moe_variants.py --out $OUT/m --no-profile \
  --variants base,session11,xla_gather --iters 10 \
  --budget-s 62 2>&1 | grep -v "Autotuning cache miss" > $OUT/m/log.txt
echo "== moe_variants done at $SECONDS s"
timeout $(lim 55) python3 experiments/bench_fastpaths.py --out $OUT/f --only moe 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/f/log.txt
echo "== bench_fastpaths done at $SECONDS s"
timeout $(lim 90) python3 experiments/bench_kernels.py --check --check-shapes 2 --anchors 3,6 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
echo "== bench_kernels done at $SECONDS s"
# 4. If time is left: the first fused Mosaic GPU kernel (issue 12, GLA scalar-decay forward) against
#    the Triton one at 8x2048x16x128.
if [ $((100 - SECONDS)) -gt 40 ]; then
  mkdir -p $OUT/g
  timeout $(lim 60) python3 experiments/gpu_check_fused.py --out $OUT/g --skip-check --skip-bench --mosaic-fused \
    2>&1 | grep -v "Autotuning cache miss" > $OUT/g/log.txt
fi
echo "== all done at $SECONDS s"
grep -E "^ +(base|session11|tiled|xla_|tokamax)|failures" $OUT/m/log.txt | cut -c1-220
python3 -c "
import json; d = json.load(open('$OUT/m/moe_variants.json'))
for r in d['rows']: print(r['variant'], r.get('fwd_bwd_ms'), {k: round(v, 4) for k, v in r.get('rel_err', {}).items()})"
tail -n 12 $OUT/f/log.txt | cut -c1-300
grep -E "^check|^\||FAIL|Error" $OUT/k/log.txt | cut -c1-250
tail -n 5 $OUT/g/log.txt 2>/dev/null | cut -c1-400
