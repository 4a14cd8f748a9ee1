# Session 7, device call 3 (one H200): `_scores_kernel` one [16, 16] tile at a time, reading only
# the key blocks left of its row block (under pl.when): run 16's program per row block read the
# whole chunk's keys in each of them and its scores stage got slower (1.48 against 1.21 ms, run
# 14; ptxas 255 -> 168 registers now). Per-dim GLA against the XLA chunk path in one process,
# the other shapes, the stages, then fla at the three anchors and the Rodimus shape with run 15's
# autotune cache; this run's autotune JSON comes back in one tarball (the result files are few).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p $TRITON_CACHE_DIR
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
timeout 60 python3 experiments/gpu_check_fused.py --out $OUT/bench --skip-check --cases 'gla:chunk,fused' \
  --shapes 8x2048x16x128 > $OUT/bench_log.txt 2>&1
timeout 90 python3 experiments/gpu_check_fused.py --out /tmp/check --skip-bench --check-impls fused > $OUT/check_log.txt 2>&1
timeout 35 python3 experiments/gpu_check_fused.py --out /tmp/stages --skip-check --skip-bench --stages '[{}]' \
  --stages-ops gla > $OUT/stages_log.txt 2>&1
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout ${FLA_LIMIT:-330} python3 experiments/gpu_check_fused.py --out $OUT/fla \
  --skip-check --cases 'gla:fused,fla' --shapes 8x2048x16x128,2x8192x16x128,1x32768x16x128,8x2048x1x64x2048 \
  > $OUT/fla_log.txt 2>&1
(cd $TRITON_CACHE_DIR && find . -name '*.autotune.json' | tar -czf $OUT/triton_autotune.tgz -T -)
for f in $OUT/*_log.txt; do echo "== $f"; grep '^{' "$f" | cut -c1-230; done
grep 'Autotuning kernel' $OUT/fla_log.txt | tail -n 2
