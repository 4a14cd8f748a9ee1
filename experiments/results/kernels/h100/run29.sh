# Session 11, the last device minutes (~6): only the MoE weight-gradient question of run 27 —
# base (tokamax's weight-gradient kernel) twice and tiled_dw (dense batched matmuls over
# group-padded tiles), each against a float32 jax.lax.ragged_dot reference. Carry: .whl.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/m
timeout 100 python3 experiments/moe_variants.py --out $OUT/m --variants base_again,tiled_dw --no-profile --budget-s 80 \
  --iters 10 2>&1 | grep -v "Autotuning cache miss" > $OUT/m/log.txt
grep -E "^ +(base|tiled)|failures" $OUT/m/log.txt | cut -c1-200
python3 -c "
import json; d = json.load(open('$OUT/m/moe_variants.json'))
for r in d['rows']: print(r['variant'], {k: round(v, 4) for k, v in r.get('rel_err', {}).items()}, {k: round(v, 4) for k, v in r.get('rel_err_vs_base', {}).items()})"
