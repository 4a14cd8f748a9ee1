# Session 10: run 23's profile again with the output kept live (run 23 profiled only what the
# gradients need: XLA dropped the GLA output kernel and the MoE combine) and every kernel named by
# the jax op its HLO came from, to tell run 23's 0.43 ms of GLA XLA fusions and the MoE layer's
# 1.5 ms of gathers/transposes apart. Carry: .whl.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 300 python3 experiments/profile_ops.py --out $OUT/p --iters 10 --top 30 --targets gla,moe_tokamax 2>&1 \
  | grep -v "Autotuning cache miss" | tee $OUT/profile_log.txt | cut -c1-230
cd $OUT && tar czf run24_out.tgz p profile_log.txt
