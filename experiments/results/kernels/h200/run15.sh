# Session 7, device call 1 (one H200): per-dimension GLA against fla's chunk_gla in one process,
# in a call of its own: runs 11 and 12 ended inside fla's autotuning (>300 s). Triton's autotune
# results are kept on disk (TRITON_CACHE_DIR under the repository, fla's cache_results) and their
# JSON comes back in $OUT, so a later call that carries them skips the tuning;
# TRITON_PRINT_AUTOTUNING shows how far the tuning got. Run from the repository root with .whl/, $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache TRITON_PRINT_AUTOTUNING=1
mkdir -p $TRITON_CACHE_DIR
if [ -f .triton_autotune.tgz ]; then tar -xzf .triton_autotune.tgz -C $TRITON_CACHE_DIR; fi
start=$SECONDS
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout ${FLA_LIMIT:-520} python3 experiments/gpu_check_fused.py --out $OUT/bench \
  --skip-check --cases 'gla:fused,fla' --shapes 8x2048x16x128,8x2048x1x64x2048 2>&1 \
  | while IFS= read -r line; do echo "[$((SECONDS - start))s] $line"; done > $OUT/bench_log.txt
(cd $TRITON_CACHE_DIR && find . -name '*.autotune.json' | tar -czf $OUT/triton_autotune.tgz -T -)
grep -c 'Triton autotuning' $OUT/bench_log.txt
grep '{"op"' $OUT/bench_log.txt | cut -c1-330
tail -n 3 $OUT/bench_log.txt | cut -c1-300
