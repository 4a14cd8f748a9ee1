# Session 11, one H100 call held to 570 s by `lim`. Per-dim GLA with g read and dg written in g's
# dtype (no float32 copies each way) and two forms of `_scores_grad_kernel`'s diagonal block
# (SCORES_GRAD_SHARED_EXP: one exp2 a step for dq's and dk's factors; SCORES_GRAD_DP_TILE: dP's
# diagonal tile loaded once). 1. agreement of GLA (float32, bf16) with the float32 scan, 2. the
# four diagonal forms at 8x2048x16x128 in one process, 3. HEAD (session 10, `.variants/head`) and
# the fastest form re-timed interleaved, a process each, 4. the MoE dispatch variants (issue 11),
# 5. the profile of the fastest form.
# Carry: .whl, .triton_autotune.tgz (run 17's), .variants (git archive HEAD pallas_kernels
# experiments/gpu_check_fused.py | tar -x -C .variants/head).
lim() { local left=$((570 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/r
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/r/gpu.txt
LOG=$OUT/r/variants_log.txt
RAW=$OUT/r/raw_log.txt
step() {   # step LABEL LIMIT SCRIPT ARGS...: its JSON rows into variants_log.txt
  local label=$1 limit=$2 script=$3; shift 3
  echo "== $label" >> $RAW
  timeout $(lim $limit) python3 $script "$@" 2>&1 | tee -a $RAW | grep '^{' \
    | sed "s/^/$label /" | tee -a $LOG | cut -c1-200
}
NEW=experiments/gpu_check_fused.py
HEAD=.variants/head/experiments/gpu_check_fused.py
step check 80 $NEW --out $OUT/r/check --skip-bench --check-ops gla --check-impls fused
SWEEP='[{}, {"SCORES_GRAD_SHARED_EXP": false}, {"SCORES_GRAD_DP_TILE": true},
 {"SCORES_GRAD_SHARED_EXP": false, "SCORES_GRAD_DP_TILE": true}]'
step sweep 110 $NEW --out $OUT/r/sweep --skip-check --skip-bench --cases 'gla:fused' --shapes 8x2048x16x128 --sweep "$SWEEP"
params=$(python3 - $LOG <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
  label, rest = (line.split(" ", 1) + [""])[:2]
  try:
    row = json.loads(rest) if label == "sweep" else {}
  except ValueError:
    continue
  if "fwd_bwd_ms" in row:
    rows.append(row)
print(json.dumps(min(rows, key=lambda r: r["fwd_bwd_ms"])["params"] if rows else {}, separators=(",", ":")))
PY
)
echo "fastest: $params" | tee -a $LOG
for i in 1 2; do
  step "bench-head" 35 $HEAD --out /tmp/bench --skip-check --cases 'gla:fused' --shapes 8x2048x16x128
  step "bench-new $params" 35 $NEW --out /tmp/bench --skip-check --cases 'gla:fused' --shapes 8x2048x16x128 --params "$params"
done
PYTHONPATH=/tmp/site:$PWD timeout $(lim 160) python3 experiments/moe_variants.py --out $OUT/r/moe > $OUT/r/moe_log.txt 2>&1
timeout $(lim 60) python3 experiments/profile_ops.py --out $OUT/r/profile --iters 10 --top 20 --targets gla \
  > $OUT/r/profile_log.txt 2>&1
echo "== $SECONDS s"; cut -c1-230 $LOG; tail -n 25 $OUT/r/moe_log.txt | cut -c1-200; head -n 16 $OUT/r/profile_log.txt | cut -c1-160
cd $OUT && tar czf run27_out.tgz r
