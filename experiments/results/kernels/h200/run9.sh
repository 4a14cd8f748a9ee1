# Session 5, device call 3 (one H200): Transformer++ on Tiny Shakespeare with nanoGPT's attention
# dropout and MQAR for DeltaNet (now on the fused kernels) and GLA + short conv, side by side
# (small models; they share the GPU, so their step times are no claim), then alone: the
# DeltaNet-340m train step with the session-5 kernels and the chunk path's ratio in one process.
# Run from the repository root with .whl/ and .data/ (a copy of ../shared/data/tinyshakespeare.txt).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ELM_DATA_DIR=$PWD/.data
XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout 260 python3 experiments/shakespeare.py --out $OUT/shakespeare \
  --runs-dir /tmp/r_sh --models transformer --workers 1 --fresh --time-limit 240 > $OUT/shakespeare_log.txt 2>&1 &
XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout 260 python3 experiments/mqar.py --out $OUT/mqar --runs-dir /tmp/r_mqar \
  --models deltanet,gla_conv --lrs 1e-3,3e-3 --workers 2 --fresh --time-limit 240 > $OUT/mqar_log.txt 2>&1
wait
timeout 100 python3 -m efficient_lm bench --config deltanet-340m --set model.n_layers=8 --set train.batch_size=8 \
  --set data.seq_len=2048 --steps 10 --warmup 2 --set model.impl=pallas > $OUT/train_step_pallas.txt 2>&1
timeout 90 python3 experiments/gpu_check_fused.py --out $OUT/chunk --skip-check \
  --cases 'delta:chunk,fused' --shapes 8x2048x16x128 > $OUT/chunk_log.txt 2>&1
for f in $OUT/*.txt; do echo "== $f"; tail -n 3 "$f" | cut -c1-400; done
