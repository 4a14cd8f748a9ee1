# One H200 call (600 s limit), after run 20 (DeltaNet MQAR 12000 steps: 1.000 at lr 1e-3 and 3e-3):
# the models that fell off at 2000 steps (run 9) trained as long, lr 3e-3, four workers of one
# process; and WikiText-2 again (run 20's JSON did not come back: the device returns 8 files),
# all concurrently. Everything under $OUT is packed into one tarball at the end.
# Carry .whl and .data.
BUDGET=${BUDGET:-570}
OUT=${OUT:?set OUT}
RES=/tmp/run21; mkdir -p $RES
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ELM_DATA_DIR=$PWD/.data
left=$((BUDGET - SECONDS))
XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 timeout -k 2 $((left - 15)) python3 experiments/mqar.py --out $RES/mqar_long \
  --models gla,linear_attention,rodimus_plus,dijiang --lrs 3e-3 --steps 12000 --workers 4 --fresh \
  --time-limit $((left - 75)) > $RES/mqar_long.log 2>&1 &
XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 timeout -k 2 $((left - 15)) python3 experiments/wikitext2.py --out $RES/wikitext2 \
  --fresh --time-limit $((left - 75)) > $RES/wikitext2.log 2>&1 &
wait
echo "== all done at ${SECONDS} s"
for f in $RES/*.log; do echo "== $f"; tail -n 14 "$f" | cut -c1-300; done
tar -czf $OUT/run21.tgz -C $RES .
