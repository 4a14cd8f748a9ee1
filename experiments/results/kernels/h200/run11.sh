# Session 6, device call 1 (one H200): the first fused kernels for GLA with a per-dimension decay
# (XLA-built intra-chunk scores, every other stage a kernel): agreement on the GPU, where the time
# goes, and fwd+bwd against the state-pass path and fla at 8x2048x16x128 and the Rodimus shape.
# Run from the repository root with .whl/ and $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 110 python3 experiments/gpu_check_fused.py --out $OUT/check --skip-bench --check-impls fused > $OUT/check_log.txt 2>&1
timeout 70 python3 experiments/gpu_check_fused.py --out $OUT/stages --skip-check --skip-bench --stages '[{}]' \
  --stages-ops gla > $OUT/stages_log.txt 2>&1
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 330 python3 experiments/gpu_check_fused.py --out $OUT/bench --skip-check \
  --cases 'gla:state_pass,fused,fla' --shapes 8x2048x16x128,8x2048x1x64x2048 > $OUT/bench_log.txt 2>&1
for f in $OUT/*_log.txt; do echo "== $f"; grep -v '^{"op": "gla", "stage"' "$f" | tail -n 3 | cut -c1-400; grep '"stage"' "$f" | cut -c1-200; done
