# Session 15 (issue 6): the recipe that met the target in the variants run (KL to the teacher, 20 of
# the 100 fine-tune steps on attention transfer: gaps +0.074 and +0.084 at seeds 0 and 1), again with
# every result file kept (the variants call returned only 8 files). Carry .whl, .data.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ELM_DATA_DIR=$PWD/.data XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
nvidia-smi --query-gpu=name --format=csv > $OUT/gpu.txt
for s in 0 1; do d=$OUT/s$s; mkdir -p $d
  timeout ${LIMIT:-560} python3 experiments/dijiang_conversion.py --objective kl --transfer-steps 20 --seed $s \
    --out $d > $d/log.txt 2>&1 &
done; wait; echo "== done at $SECONDS s"; grep -H "Target\|gap" $OUT/s*/log.txt | cut -c1-300
