# Session 10, one H200 call (600 s limit): MQAR at 12000 steps for the two models session 9's long
# table lacked, Transformer++ and Rodimus (lr 3e-3, as run 21), one process each, concurrently,
# held to BUDGET (580) s. Carry .whl and .data.
BUDGET=${BUDGET:-580}
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ELM_DATA_DIR=$PWD/.data
left=$((BUDGET - SECONDS))
TL=$((left - 50)); TO=$((left - 3))
for m in transformer rodimus; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout -k 2 $TO python3 experiments/mqar.py --out $OUT/mqar_long_$m \
    --runs-dir /tmp/r_$m --models $m --lrs 3e-3 --steps 12000 --workers 1 --fresh --time-limit $TL \
    > $OUT/mqar_long_$m.log 2>&1 &
done
wait
for m in transformer rodimus; do tail -n 4 $OUT/mqar_long_$m.log | cut -c1-300; done
cd $OUT && tar czf run26_out.tgz mqar_long_* 
