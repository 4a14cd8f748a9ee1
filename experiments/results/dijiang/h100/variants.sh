# Session 14 (issue 6): DiJiang conversion variants against run 33's CE seed-0 baseline (gap 0.124).
# Carry .whl, .data. Five processes share the GPU: CE seed 1; KL to the teacher with 0 and 20
# transfer steps, seeds 0 and 1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ELM_DATA_DIR=$PWD/.data XLA_PYTHON_CLIENT_MEM_FRACTION=0.15
nvidia-smi --query-gpu=name --format=csv > $OUT/gpu.txt
for r in "ce 0 1" "kl 0 0" "kl 0 1" "kl 20 0" "kl 20 1"; do set -- $r; d=$OUT/d_$1_t$2_s$3; mkdir -p $d
  timeout ${LIMIT:-560} python3 experiments/dijiang_conversion.py --objective $1 --transfer-steps $2 --seed $3 \
    --out $d > $d/log.txt 2>&1 &
done; wait; echo "== done at $SECONDS s"; grep -H "Target\|gap" $OUT/d_*/log.txt | cut -c1-300; tail -n 3 $OUT/d_*/log.txt | cut -c1-300
