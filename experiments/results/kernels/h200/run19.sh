# Prepared in session 8 (no device time left that session), not yet run. One H200 call, held to
# 570 s by `lim`. Per-dim GLA's score kernels: four versions of the file, made from HEAD's
# pallas_kernels/common/chunk_kernels_triton.py by `run19/apply.py` (text edits in versions.json),
#   base    HEAD: run 18's v2 (session 6's per-chunk `_scores_kernel`, per-row-block scores grad)
#   exp2    exp2 in both diagonal loops (run 18: -0.15 ms fwd+bwd on another version)
#   blocks  `_scores_grad_kernel` loops over only the earlier (dq) and later (dk) 16-row blocks
#           instead of decaying the whole chunk's k and q tiles in each of its C/16 programs
#   both    exp2 + blocks
# each at SCORES_BLOCK_K None (all 128 key columns in one `_scores_kernel` program, the default),
# 64 and 32 (float32 shares of P summed by XLA). The scores kernel is most of the forward (1.21-1.57
# of ~1.5-2.0 ms, runs 14-17), and the forward is where fla leads (1.0 against 1.47 ms).
# Offline (ptxas_report, kd=vd=128, Triton 3.6; run19/ptxas_*.json): scores 255 registers with 88
# bytes spilled -> 236 (BK 64) and 127 (BK 32) without spills; scores grad 163 -> 119 registers and
# 20 -> 4 KB shared with `blocks`.
# 1. Each version's sweep over SCORES_BLOCK_K at 8x2048x16x128 (fwd, fwd+bwd); the fastest
#    (version, BK) is picked on time alone, then 2. checked against the float32 scan (float32 and
#    bf16), 3. timed against the XLA chunk path and fla in one process at the anchors (run 17's
#    autotune cache, carried as .triton_autotune.tgz, skips fla's ~300 s of tuning), 4. its stages,
#    5. re-timed interleaved with HEAD's default (runs 15-17 saw ~15% spread between processes).
# Every step's whole output goes to raw_log.txt; variants_log.txt holds the rows that matter.
# Carry: .whl and .triton_autotune.tgz (cp experiments/results/kernels/h200/run17/triton_autotune.tgz).
lim() { local left=$((570 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
KERNELS=pallas_kernels/common/chunk_kernels_triton.py
RUN=experiments/results/kernels/h200/run19
LOG=$OUT/variants_log.txt
RAW=$OUT/raw_log.txt
cp $KERNELS /tmp/base_kernels.py
use() {   # a version whose edits no longer apply is logged and skipped
  cp /tmp/base_kernels.py $KERNELS
  if [ "$1" != base ] && ! python3 $RUN/apply.py $1 2>> $LOG; then cp /tmp/base_kernels.py $KERNELS; return 1; fi
}
step() {   # step LABEL LIMIT ARGS...: gpu_check_fused.py, its JSON rows into variants_log.txt
  local label=$1 limit=$2; shift 2
  echo "== $label" >> $RAW
  timeout $(lim $limit) python3 experiments/gpu_check_fused.py "$@" 2>&1 | tee -a $RAW | grep '^{' \
    | sed "s/^/$label /" | tee -a $LOG | cut -c1-200
}
SWEEP='[{}, {"SCORES_BLOCK_K": 64}, {"SCORES_BLOCK_K": 32}]'
for v in base exp2 blocks both; do
  use $v || continue
  step "$v sweep" 70 --out /tmp/sweep_$v --skip-check --skip-bench --cases 'gla:fused' --shapes 8x2048x16x128 \
    --sweep "$SWEEP"
done
read -r best params < <(python3 - $LOG <<'EOF'
import json, sys
rows = []
for line in open(sys.argv[1]):
  v, kind, rest = (line.split(" ", 2) + ["", ""])[:3]
  try:
    row = json.loads(rest) if kind == "sweep" else {}
  except ValueError:
    print(f"unreadable sweep row: {line[:120]!r}", file=sys.stderr)
    continue
  if "fwd_bwd_ms" in row:
    rows.append((v, row))
if not rows:
  print("no sweep row timed: falling back to base", file=sys.stderr)
v, r = min(rows, key=lambda vr: vr[1]["fwd_bwd_ms"]) if rows else ("base", {"params": {}})
print(v, json.dumps(r["params"], separators=(",", ":")))
EOF
)
echo "pass 1 fastest: $best $params" | tee -a $LOG
use $best || { best=base; params={}; use base; }
step "$best $params check" 60 --out /tmp/check --skip-bench --check-ops gla --check-impls fused --params "$params"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step "$best $params fla" ${FLA_LIMIT:-200} --out $OUT/fla --skip-check \
  --cases 'gla:chunk,fused,fla' --params "$params" --shapes 8x2048x16x128,2x8192x16x128,1x32768x16x128,8x2048x1x64x2048
step "$best $params stages" 35 --out /tmp/stages --skip-check --skip-bench --stages "[$params]" --stages-ops gla
for vp in "base {}" "$best $params" "base {}" "$best $params"; do
  read -r v p <<< "$vp"
  use $v || continue
  step "$v $p bench" 45 --out /tmp/bench_$v --skip-check --cases 'gla:fused' --shapes 8x2048x16x128 --params "$p"
done
cp /tmp/base_kernels.py $KERNELS
echo "== $SECONDS s"; cut -c1-230 $LOG
grep 'Autotuning kernel' $RAW | tail -n 2
