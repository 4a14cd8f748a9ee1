# The session's last ~280 s of device time, after run 21 (GLA without a short conv at chance,
# loss ln 4096, after 12000 steps): GLA with FLA's short q/k/v convs, same setting, alone on the GPU,
# cut by a time limit (the row says how many steps it trained). Carry .whl and .data.
OUT=${OUT:?set OUT}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/run22
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ELM_DATA_DIR=$PWD/.data
timeout -k 2 $((235 - SECONDS)) python3 experiments/mqar.py --out /tmp/run22/mqar_long --models gla_conv --lrs 3e-3 \
  --steps 12000 --workers 1 --fresh --time-limit $((190 - SECONDS)) > /tmp/run22/mqar_long.log 2>&1
tail -n 12 /tmp/run22/mqar_long.log | cut -c1-300
tar -czf $OUT/run22.tgz -C /tmp/run22 .
