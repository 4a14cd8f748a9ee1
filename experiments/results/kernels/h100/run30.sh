# Session 12, call 1 (H100, held to 450 s: two failed starts left 25 device minutes for two calls). Carry: .whl, .data (a copy of ../shared/data).
# 1. The MoE layer with session 12's Pallas kernels (pallas_kernels/moe/triton.py: the grouped
#    weight gradient walking each expert's rows, the token-row gather), against session 11's
#    library (tiled weight gradient, XLA gathers), each piece alone, and tokamax's own weight
#    gradient twice; every variant against a float32 jax.lax.ragged_dot reference; kernel profile
#    of base and the fastest.
# 2. bench_fastpaths, every section (moe, step first): issue 11's numbers with the new defaults.
# 3. The calibrated DiJiang conversion (issue 6) on the GPU.
# 4. If time is left: tokamax's weight-gradient kernel with wgmma_wait(0) patched in (the race test).
lim() { local left=$((450 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ELM_DATA_DIR=$PWD/.data
mkdir -p $OUT/m $OUT/f $OUT/d $OUT/p
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $(lim 150) python3 experiments/moe_variants.py --out $OUT/m \
  --variants base,session11,tiled_wgrad,xla_gather,tokamax_wgrad,tokamax_wgrad_again,base_again \
  --budget-s 135 2>&1 | grep -v "Autotuning cache miss" > $OUT/m/log.txt
echo "== moe_variants done at $SECONDS s"
timeout $(lim 140) python3 experiments/bench_fastpaths.py --out $OUT/f --only moe,step,loss,attention 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/f/log.txt
echo "== bench_fastpaths done at $SECONDS s"
timeout $(lim 160) python3 experiments/dijiang_conversion.py --out $OUT/d > $OUT/d/log.txt 2>&1
echo "== dijiang done at $SECONDS s"
if [ $((450 - SECONDS)) -gt 70 ]; then
  K=/tmp/site/tokamax/_src/ops/ragged_dot/pallas_mosaic_gpu_kernel_sm90.py
  python3 - $K <<'PY'
import sys
src = open(sys.argv[1]).read()
old = "      plgpu.wgmma(acc, lhs_smem[...] * mask, rhs_smem)\n      plgpu.wgmma_wait(1)"
assert old in src, "kernel text not found"
open(sys.argv[1], "w").write(src.replace(old, old[:-2] + "0)"))
PY
  timeout $(lim 60) python3 experiments/moe_variants.py --out $OUT/p --variants tokamax_wgrad,tokamax_wgrad_again \
    --no-profile --budget-s 50 --iters 5 2>&1 | grep -v "Autotuning cache miss" > $OUT/p/log.txt
fi
echo "== all done at $SECONDS s"
grep -E "^ +(base|session11|tiled|xla_|tokamax)|failures" $OUT/m/log.txt | cut -c1-220
for d in m p; do [ -f $OUT/$d/moe_variants.json ] && python3 -c "
import json; d = json.load(open('$OUT/$d/moe_variants.json'))
for r in d['rows']: print('$d', r['variant'], r.get('fwd_bwd_ms'), {k: round(v, 4) for k, v in r.get('rel_err', {}).items()})"; done
tail -n 12 $OUT/f/log.txt | cut -c1-300
grep -iE "gap|teacher|after" $OUT/d/log.txt | tail -n 8 | cut -c1-300
