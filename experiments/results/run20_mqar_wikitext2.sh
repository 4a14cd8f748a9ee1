# One H200 call (600 s limit): MQAR DeltaNet 12000 steps at lr 1e-3 and 3e-3 (one process each)
# and WikiText-2 (3 models as 3 workers), all concurrently; the whole held to BUDGET (585) s.
# Run from the repository root; carry .whl and .data. GPU processes: 2 mqar workers + 3 wikitext2
# workers (the two parents run on the CPU), so memory 2 x 0.2 + 3 x 0.15 = 0.85 of the GPU.
# Smoke/overrides: MQ_STEPS, MQ_EXTRA, WT_EXTRA, BUDGET.
BUDGET=${BUDGET:-585}
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
if [ -d .whl ] && command -v nvidia-smi > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 ELM_DATA_DIR=$PWD/.data
left=$((BUDGET - SECONDS))
min() { echo $(( $1 < $2 ? $1 : $2 )); }
# after its deadline a run trains up to log_every more steps (mqar 250, wikitext2 50), evaluates,
# and the parent writes JSON + PNG; the deadline counts from run_pool's start (~5-10 s in)
MQ_TL=$(min 520 $((left - 50)));  WT_TL=$(min 540 $((left - 60)))
TO=$((left - 3))
echo "install done at ${SECONDS} s; left $left s: mqar --time-limit $MQ_TL, wikitext2 --time-limit $WT_TL, timeout $TO"
for lr in 1e-3 3e-3; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout -k 2 $TO python3 experiments/mqar.py --out $OUT/mqar_long_$lr \
    --models deltanet --lrs $lr --steps ${MQ_STEPS:-12000} --workers 1 --fresh --time-limit $MQ_TL $MQ_EXTRA \
    > $OUT/mqar_long_$lr.log 2>&1 &
done
XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 timeout -k 2 $TO python3 experiments/wikitext2.py --out $OUT/wikitext2 \
  --fresh --time-limit $WT_TL $WT_EXTRA > $OUT/wikitext2.log 2>&1 &
wait
echo "== all done at ${SECONDS} s"
for f in $OUT/*.log; do echo "== $f"; tail -n 12 "$f" | cut -c1-300; done
python3 - "$OUT" <<'EOF'
import glob, json, sys
for p in sorted(glob.glob(f"{sys.argv[1]}/*/*.json")):
  d = json.load(open(p))
  m = d["meta"]
  print(p, "complete", m.get("complete"), "wall", m.get("wall_s"), "failed", m.get("failed"))
  for r in d["rows"]:
    print("  ", {k: r[k] for k in r if k in ("model", "lr", "accuracy", "loss", "test_ppl", "steps",
                                              "wall_s", "step_s")})
  for k, det in m.get("run_details", {}).items():
    print("  ", k, "step_s", det.get("step_s"), "compile_s", det.get("compile_s"))
EOF
