# Session 11, one call held to 570 s: issue 3's benchmark as the issue names it
# (`experiments/bench_kernels.py --check`: agreement with the float32 scan on this device, then
# every anchor of recurrences.md section 5 with scan, chunk, pallas and fla in one process), then
# bench_fastpaths' MoE section (issue 11). Carry: .whl, .triton_autotune.tgz (run 17's fla
# autotune cache: fla's configs as tuned on the H200, same sm_90 target).
lim() { local left=$((570 - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR $OUT/k $OUT/f
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/k/gpu.txt
timeout $(lim 440) python3 experiments/bench_kernels.py --check --out $OUT/k 2>&1 \
  | grep -v "Autotuning cache miss" > $OUT/k/log.txt
timeout $(lim 120) python3 experiments/bench_fastpaths.py --only moe --out $OUT/f > $OUT/f/log.txt 2>&1
echo "== $SECONDS s"; grep -E "^check|^\|" $OUT/k/log.txt | cut -c1-250; tail -n 12 $OUT/f/log.txt | cut -c1-200
