# Session 11, one call held to 300 s (failed starts left 10 device minutes). 1. The MoE layer's dispatch variants again (run 27:
# swap 4.14 / swap_pgather 4.04 against base 5.11 ms, but every variant's weight gradients differed
# from base by 2-12%, base's own too?): each against a float32 jax.lax.ragged_dot reference at
# full precision, and base run twice (determinism). 2. Issue 3's benchmark as the issue names it
# (`experiments/bench_kernels.py --check`: agreement with the float32 scan at the anchors' T, K
# and V, then every anchor of recurrences.md section 5 with scan, chunk, pallas and fla in one
# process). Carry: .whl, .triton_autotune.tgz (run 17's fla autotune cache: fla's configs as
# tuned on the H200, the same sm_90 target).
lim() { local left=$((300 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/k $OUT/m
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/k/gpu.txt
timeout $(lim 120) python3 experiments/moe_variants.py --out $OUT/m --variants base_again,tokamax_wgrad,swap \
  --no-profile --budget-s 100 2>&1 | grep -v "Autotuning cache miss" > $OUT/m/log.txt
timeout $(lim 165) python3 experiments/bench_kernels.py --check --check-shapes 2 --anchors 3,6 --iters 10 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
echo "== $SECONDS s"; grep -E "^ +(base|swap|tokamax)|failures" $OUT/m/log.txt | cut -c1-200
python3 -c "
import json; d = json.load(open('$OUT/m/moe_variants.json'))
for r in d['rows']: print(r['variant'], {k: round(v, 4) for k, v in r.get('rel_err', {}).items()}, {k: round(v, 4) for k, v in r.get('rel_err_vs_base', {}).items()})"
grep -E "^check|^\|" $OUT/k/log.txt | cut -c1-250
