# Prepared in session 11, not run (no machine could be started): the MoE weight-gradient question
# of run 27 — tokamax's weight-gradient kernel twice and the library's default (base:
# kernels.grouped_weight_grad), each against a float32 jax.lax.ragged_dot reference; then tokamax's again with its sm90
# weight-gradient kernel patched to wait for each wgmma before the next masked register lhs
# (a helper's CPU reading: that kernel alone feeds wgmma a register operand while one wgmma is
# still in flight, `wgmma_wait(1)`). Carry: .whl.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/m $OUT/p
timeout 75 python3 experiments/moe_variants.py --out $OUT/m --variants tokamax_wgrad,tokamax_wgrad_again --no-profile --budget-s 60 \
  --iters 10 2>&1 | grep -v "Autotuning cache miss" > $OUT/m/log.txt
K=/tmp/site/tokamax/_src/ops/ragged_dot/pallas_mosaic_gpu_kernel_sm90.py
python3 - $K <<'PY'
import sys
src = open(sys.argv[1]).read()
old = "      plgpu.wgmma(acc, lhs_smem[...] * mask, rhs_smem)\n      plgpu.wgmma_wait(1)"
assert old in src, "kernel text not found"
open(sys.argv[1], "w").write(src.replace(old, old[:-2] + "0)"))
PY
timeout 45 python3 experiments/moe_variants.py --out $OUT/p --variants tokamax_wgrad --no-profile --budget-s 35 \
  --iters 5 2>&1 | grep -v "Autotuning cache miss" > $OUT/p/log.txt
for d in m p; do python3 -c "
import json; d = json.load(open('$OUT/$d/moe_variants.json'))
for r in d['rows']: print('$d', r['variant'], r.get('fwd_bwd_ms'), {k: round(v, 4) for k, v in r.get('rel_err', {}).items()}, {k: round(v, 4) for k, v in r.get('rel_err_vs_base', {}).items()})"; done
