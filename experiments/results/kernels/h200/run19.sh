# Prepared in session 8 (no device time left that session), not yet run. One H200 call, ~8 of
# its 10 minutes. Per-dim GLA's score kernels: four versions of the file, made from HEAD's
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
# 20 -> 4 KB shared with `blocks`; exp2 cuts static SASS by 7% (scores) and 6% (scores grad).
# Pass 1: each version's sweep over SCORES_BLOCK_K at 8x2048x16x128 (fwd, fwd+bwd). Pass 2: the
# fastest (version, BK) and HEAD's default again, interleaved (runs 15-17 saw ~15% spread between
# processes). Then the winner's agreement check (float32 and bf16 against the float32 scan), its
# stages, and the winner against the XLA chunk path and fla in one process at the anchors (run 17's
# autotune cache, carried as .triton_autotune.tgz, skips fla's ~300 s of tuning).
# Carry: .whl and .triton_autotune.tgz (cp experiments/results/kernels/h200/run17/triton_autotune.tgz).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
KERNELS=pallas_kernels/common/chunk_kernels_triton.py
RUN=experiments/results/kernels/h200/run19
LOG=$OUT/variants_log.txt
cp $KERNELS /tmp/base_kernels.py
use() {   # a version whose edits no longer apply is logged and skipped
  cp /tmp/base_kernels.py $KERNELS
  if [ "$1" != base ] && ! python3 $RUN/apply.py $1 2>> $LOG; then cp /tmp/base_kernels.py $KERNELS; return 1; fi
}
SWEEP='[{}, {"SCORES_BLOCK_K": 64}, {"SCORES_BLOCK_K": 32}]'
for v in base exp2 blocks both; do
  use $v || continue
  timeout 70 python3 experiments/gpu_check_fused.py --out /tmp/sweep_$v --skip-check --skip-bench --cases 'gla:fused' \
    --shapes 8x2048x16x128 --sweep "$SWEEP" 2>&1 | grep '^{' | sed "s/^/$v sweep /" | tee -a $LOG | cut -c1-200
done
read -r best params < <(python3 - $LOG <<'EOF'
import json, sys
rows = [(l.split(" ", 2)[0], json.loads(l.split(" ", 2)[2])) for l in open(sys.argv[1]) if " sweep {" in l]
rows = [(v, r) for v, r in rows if "fwd_bwd_ms" in r]
v, r = min(rows, key=lambda vr: vr[1]["fwd_bwd_ms"]) if rows else ("base", {"params": {}})
print(v, json.dumps(r["params"], separators=(",", ":")))
EOF
)
echo "pass 1 fastest: $best $params" | tee -a $LOG
for vp in "$best $params" "base {}" "base {}" "$best $params"; do
  read -r v p <<< "$vp"
  use $v || continue
  timeout 45 python3 experiments/gpu_check_fused.py --out /tmp/bench_$v --skip-check --cases 'gla:fused' \
    --shapes 8x2048x16x128 --params "$p" 2>&1 | grep '^{' | sed "s/^/$v $p bench /" | tee -a $LOG | cut -c1-200
done
use $best || { best=base; params={}; }
timeout 60 python3 experiments/gpu_check_fused.py --out /tmp/check --skip-bench --check-ops gla --check-impls fused \
  --params "$params" 2>&1 | grep '^{' | sed "s/^/$best $params check /" | tee -a $LOG | cut -c1-200
timeout 35 python3 experiments/gpu_check_fused.py --out /tmp/stages --skip-check --skip-bench --stages "[$params]" \
  --stages-ops gla > $OUT/stages_log.txt 2>&1
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout ${FLA_LIMIT:-200} python3 experiments/gpu_check_fused.py --out $OUT/fla \
  --skip-check --cases 'gla:chunk,fused,fla' --params "$params" \
  --shapes 8x2048x16x128,2x8192x16x128,1x32768x16x128,8x2048x1x64x2048 > $OUT/fla_log.txt 2>&1
cp /tmp/base_kernels.py $KERNELS
for f in $OUT/*_log.txt; do echo "== $f"; grep '^{' "$f" | cut -c1-230; done
grep 'Autotuning kernel' $OUT/fla_log.txt | tail -n 2
