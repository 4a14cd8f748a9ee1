# Session 10, one H200 call held to 560 s by `lim`. Per-dim GLA with the in-chunk cumsums of g and
# dg in `_cumsum_kernel` (PALLAS_CUMSUM, new; run 24's profile: XLA's cumsums took 0.39 of 3.31 ms)
# and sweeps of the scores gradient's launch (SCORES_GRAD_PARAMS, SCORES_GRAD_BLOCK_K: it is 1.28 ms,
# 39%). 1. the agreement check of GLA (float32, bf16) against the float32 scan at 8x2048x16x128,
# 2. the sweep, fwd+bwd at 8x2048x16x128, 3. the fastest set against the chunk path and fla at the
# four anchors, one process, 4. the profile of the defaults, 5. the defaults and the fastest set
# re-timed interleaved, one process each.
# Carry: .whl and .triton_autotune.tgz (cp experiments/results/kernels/h200/run17/triton_autotune.tgz).
lim() { local left=$((560 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/r
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
LOG=$OUT/r/variants_log.txt
RAW=$OUT/r/raw_log.txt
step() {   # step LABEL LIMIT ARGS...: gpu_check_fused.py, its JSON rows into variants_log.txt
  local label=$1 limit=$2; shift 2
  echo "== $label" >> $RAW
  timeout $(lim $limit) python3 experiments/gpu_check_fused.py "$@" 2>&1 | tee -a $RAW | grep '^{' \
    | sed "s/^/$label /" | tee -a $LOG | cut -c1-200
}
step check 70 --out $OUT/r/check --skip-bench --check-ops gla --check-impls fused
SWEEP='[{}, {"PALLAS_CUMSUM": false}, {"SCORES_GRAD_PARAMS": [2, 1]}, {"SCORES_GRAD_PARAMS": [4, 2]},
 {"SCORES_GRAD_BLOCK_K": 128}, {"SCORES_GRAD_BLOCK_K": 128, "SCORES_GRAD_PARAMS": [8, 1]},
 {"SCORES_GRAD_BLOCK_K": 32}]'
step sweep 120 --out $OUT/r/sweep --skip-check --skip-bench --cases 'gla:fused' --shapes 8x2048x16x128 --sweep "$SWEEP"
params=$(python3 - $LOG <<'EOF'
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
EOF
)
echo "fastest: $params" | tee -a $LOG
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step "fla $params" 200 --out $OUT/r/fla --skip-check --params "$params" \
  --cases 'gla:chunk,fused,fla' --shapes 8x2048x16x128,2x8192x16x128,1x32768x16x128,8x2048x1x64x2048
timeout $(lim 60) python3 experiments/profile_ops.py --out $OUT/r/profile --iters 10 --top 20 --targets gla \
  > $OUT/r/profile_log.txt 2>&1
for p in "{}" "$params" "{}" "$params"; do
  step "bench $p" 40 --out /tmp/bench --skip-check --cases 'gla:fused' --shapes 8x2048x16x128 --params "$p"
done
echo "== $SECONDS s"; cut -c1-230 $LOG; cat $OUT/r/profile_log.txt | cut -c1-200
cd $OUT && tar czf run25_out.tgz r
