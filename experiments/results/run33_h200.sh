# Session 13, call 2 (H200, held to 575 s; the H100 did not start). Carry: .whl, .data, .triton_autotune.tgz.
# 1. Issue 12: the fused Mosaic GPU GLA forward's first GPU check (jax 0.11.2), against the Triton
#    fused forward at 8x2048x16x128 bf16, alone on the GPU (its times are read from this step only).
# 2. Issue 6, three processes sharing the GPU: MQAR at 12000 steps for Transformer++ and Rodimus
#    (lr 3e-3, as run 26 planned) and the calibrated DiJiang conversion (the script's default).
lim() { local left=$((575 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache ELM_DATA_DIR=$PWD/.data
mkdir -p $TRITON_CACHE_DIR $OUT/mf $OUT/x/d
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $(lim 80) python3 experiments/gpu_check_fused.py --out $OUT/mf --skip-check --skip-bench --mosaic-fused \
  --shapes 8x2048x16x128 2>&1 | grep -v "Autotuning cache miss" > $OUT/mf/log.txt
echo "== mosaic fused done at $SECONDS s"
left=$((575 - SECONDS)); TL=$((left - 45)); TO=$((left - 20))
for m in transformer rodimus; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout -k 2 $TO python3 experiments/mqar.py --out $OUT/x/mqar_long_$m \
    --runs-dir /tmp/r_$m --models $m --lrs 3e-3 --steps 12000 --workers 1 --fresh --time-limit $TL \
    > $OUT/x/mqar_long_$m.log 2>&1 &
done
XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout -k 2 $TO python3 experiments/dijiang_conversion.py --out $OUT/x/d \
  > $OUT/x/d/log.txt 2>&1 &
wait
echo "== all done at $SECONDS s"
grep -E '^\{' $OUT/mf/log.txt | cut -c1-400; tail -n 3 $OUT/mf/log.txt | cut -c1-600
for m in transformer rodimus; do tail -n 3 $OUT/x/mqar_long_$m.log | cut -c1-300; done
grep -iE "gap|teacher|after" $OUT/x/d/log.txt | tail -n 8 | cut -c1-300
cd $OUT && tar czf run33_x.tgz x && rm -rf x
