# Session 12, call 2 (held to 560 s), the rest of run 30's: bench_kernels --check at the anchors and
# check shapes run 30 left (2x8192 and 1x32768 for GLA and the delta rule), then the calibrated DiJiang
# conversion (issue 6). Carry: .whl, .triton_autotune.tgz, .data (a copy of ../shared/data).
lim() { local left=$((560 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache ELM_DATA_DIR=$PWD/.data
mkdir -p $TRITON_CACHE_DIR $OUT/k $OUT/d
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/gpu.txt
timeout $(lim 150) python3 experiments/dijiang_conversion.py --out $OUT/d > $OUT/d/log.txt 2>&1
echo "== dijiang done at $SECONDS s"
timeout $(lim 400) python3 experiments/bench_kernels.py --check --check-shapes 3,1 --anchors 4,1,5,2 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
echo "== all done at $SECONDS s"
grep -iE "gap|teacher|after" $OUT/d/log.txt | tail -n 8 | cut -c1-300
grep -E "^check|^\||FAIL|Error" $OUT/k/log.txt | cut -c1-250
