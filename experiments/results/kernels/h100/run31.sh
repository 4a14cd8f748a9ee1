# Session 12, call 2 (H100, held to 560 s; the anchors ordered so GLA 8x2048 and the Rodimus shape come first): issue 3's benchmark as the issue names it, on the H100:
# `bench_kernels.py --check` (agreement with the float32 scan at the anchors' T, K and V, then every
# anchor of recurrences.md section 5 with scan, chunk, pallas and fla in one process).
# Carry: .whl, .triton_autotune.tgz (run 17's fla autotune cache: fla's configs as tuned on the H200,
# the same sm_90 target).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/k
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/k/gpu.txt
timeout $((560 - SECONDS)) python3 experiments/bench_kernels.py --check --anchors 3,6,0,4,1,5,2 --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
echo "== $SECONDS s"
grep -E "^check|^\||FAIL|Error" $OUT/k/log.txt | cut -c1-250
