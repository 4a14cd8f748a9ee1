# Session 18 (issue 12): run 48's agreement check at the Rodimus shape 1x2048x1x64x2048 gave dg NaN
# on the Mosaic GPU per-dim kernels (H200; o, dq, dk, dv, ds0 passed; 1x1024x4x128 passed everything;
# run 47's kernels passed that shape on the H100; interpret mode on the CPU gives no non-finite
# gradient there). dg is the only output whose code changed alone since run 47 (session 17's U db in
# the chunk-gradient kernel; this session's level masks feed dq and dk too, which passed), so this
# tree went back to run 47's db output + XLA's reverse cumsum. No device was lent after that.
# In order (each step's timeout capped by what is left of RUN_SECONDS, default 540):
#   1. dg's in-chunk reverse cumsum in XLA alone (db float32 -> bf16, 8x2048x16x128): jnp.flip +
#      cumsum (this tree), lax.cumsum(reverse=True), a float32 HIGHEST matmul by the upper ones.
#   2. mosaic_check, Triton vs Mosaic GPU: agreement at the Rodimus check shape, fwd / fwd+bwd at the
#      four per-dim anchors (run 48 on the H200: 1.08 / 0.91 / 0.87x Triton at the first three; the
#      Rodimus timing shape ran past that step's 240 s).
#   3. fwd+bwd at 8x2048x16x128 under Triton and under Mosaic GPU: device-time profiles (run 48's
#      Mosaic wall, 2.21 ms, was 0.44 ms above its device time, 1.77; is Triton's gap as large?),
#      then the host's enqueue time and the wall time per call over unblocked calls (is either path
#      host-bound?), by default and with XLA's command buffers (CUDA graphs) asked to take custom
#      calls (jax-ml/jax#27988: pallas_call kernels are left out of them by default).
#   4. Gradients at the Rodimus check shape (three repeats: a race shows as varying counts), non-finite
#      counts, where (rows within the chunk, chunks) and max |grad|: session 17's U db kernels
#      (274f8e3's pallas_kernels in .variants/udb), then this tree, also at 1x2048x1x64x128.
# About 9 min at the default. Carry: .whl, .variants.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PALLAS_KERNELS_GPU=mosaic_gpu
END=$(( $(date +%s) + ${RUN_SECONDS:-540} ))   # each step gets at most what is left: lower RUN_SECONDS when failed starts ate device time
t() { local left=$(( END - $(date +%s) )); echo $(( $1 < left ? $1 : (left > 5 ? left : 5) )); }
R=$PWD
cat > /tmp/nan_check.py <<'PY'
import sys
import pallas_kernels   # first: the variant's package, before anything puts the repository first
import jax, jax.numpy as jnp, numpy as np
from experiments import mosaic_check as mc
from pallas_kernels.common import gla_perdim_kernels_mosaic_gpu as G
print("== kernels from", G.__file__.split("/work/")[-1] if "/work/" in G.__file__ else G.__file__)
for shape in sys.argv[1:]:
  b, t, h, kd, vd = map(int, shape.split("x"))
  x = mc._inputs("gla_perdim", b, t, h, kd, vd, seed=1)
  do = jnp.asarray(np.random.default_rng(2).standard_normal((b, t, h, vd)), jnp.float32)
  def loss(q, k, v, g, s0):
    o, s = G.fused_gla_perdim(kd ** -0.5, 64, False, q, k, v, g, s0)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  for rep in range(3):
    out = dict(zip("qkvg", grad(x["q"], x["k"], x["v"], x["g"], x["s0"])))
    line = [shape, f"rep {rep}"]
    for n, a in out.items():
      a = np.asarray(a.astype(jnp.float32))
      bad = ~np.isfinite(a)
      line.append(f"d{n} max {np.abs(np.where(bad, 0, a)).max():.3g} bad {bad.sum()}")
      if bad.any():
        ti = np.nonzero(bad)[1]
        line.append(f"(rows {sorted(set((ti % 64).tolist()))[:12]} chunks {sorted(set((ti // 64).tolist()))[:12]})")
    print(" | ".join(line), flush=True)
PY
cat > /tmp/rev_cumsum.py <<'PY'
import functools, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from pallas_kernels.common.gla_perdim_kernels_mosaic_gpu import chunk_reverse_cumsum
C = 64
def reverse_form(x, chunk, dtype):
  b, t, h, k = x.shape
  return lax.cumsum(x.reshape(b, t // chunk, chunk, h, k), axis=2, reverse=True).reshape(x.shape).astype(dtype)
def matmul_form(x, chunk, dtype):
  b, t, h, k = x.shape
  upper = jnp.triu(jnp.ones((chunk, chunk), jnp.float32))
  return jnp.einsum("ij,bnjhk->bnihk", upper, x.reshape(b, t // chunk, chunk, h, k), precision=lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32).reshape(x.shape).astype(dtype)
forms = {"flip (this tree)": chunk_reverse_cumsum, "reverse": reverse_form, "matmul": matmul_form}
shape = tuple(map(int, sys.argv[1].split("x")))
x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
xn = np.asarray(x, np.float64).reshape(shape[0], shape[1] // C, C, *shape[2:])
ref = np.flip(np.cumsum(np.flip(xn, 2), 2), 2).reshape(shape)
for n, f in forms.items():   # float32 out: the form's own error, not bf16's rounding
  y = np.asarray(jax.jit(functools.partial(f, chunk=C, dtype=jnp.float32))(x))
  print(f"{n}: max err / max |ref| {np.abs(y - ref).max() / np.abs(ref).max():.2e}")
fs = {n: jax.jit(functools.partial(f, chunk=C, dtype=jnp.bfloat16)) for n, f in forms.items()}
ts = {n: [] for n in fs}
for rnd in range(5):
  for n, f in fs.items():
    jax.block_until_ready(f(x)); t0 = time.perf_counter()
    for _ in range(50): y = f(x)
    jax.block_until_ready(y); ts[n].append((time.perf_counter() - t0) / 50 * 1e3)
print(" | ".join(f"{n} {np.median(v):.4f} ms" for n, v in ts.items()), "(median of 5 rounds x 50 calls)", shape)
PY
export PYTHONPATH=/tmp/site:$R
timeout $(t 40) python3 /tmp/rev_cumsum.py 8x2048x16x128 2>&1 | grep -E "err|ms"
F=1x2048x1x64x2048
mkdir -p $OUT/c
timeout $(t 330) python3 experiments/mosaic_check.py --out $OUT/c --ops gla_perdim --backends triton,mosaic_gpu \
  --check-shape $F --shape 8x2048x16x128,2x8192x16x128,1x32768x16x128,8x2048x1x64x2048 2>&1 \
  | grep -v "^E12\|onstant\|^$" > $OUT/c/log.txt
grep -h '^{' $OUT/c/log.txt | cut -c1-330; tail -n 2 $OUT/c/log.txt | cut -c1-300
CB='--xla_gpu_enable_command_buffer=+CUSTOM_CALL --xla_gpu_graph_min_graph_size=1'   # both parse under jax 0.11.2
for be in triton mosaic_gpu; do for flags in "" "$CB"; do
  XLA_FLAGS="$flags" PALLAS_KERNELS_GPU=$be timeout $(t 75) python3 -c "
import time, jax, numpy as np
from experiments import profile_ops
if not '$flags':
  profile_ops.profile('gla_default', False, 20, 8)
fn, args, _ = profile_ops.make_target('gla_default', False)
c = fn.lower(*args).compile()
for _ in range(3): jax.block_until_ready(c(*args))
enqueue, wall = [], []
for rnd in range(5):
  t0 = time.perf_counter()
  for _ in range(20): out = c(*args)
  t1 = time.perf_counter(); jax.block_until_ready(out)
  enqueue.append((t1 - t0) / 20 * 1e3); wall.append((time.perf_counter() - t0) / 20 * 1e3)
print(f'$be XLA_FLAGS=[$flags] host enqueue {np.median(enqueue):.3f} ms/call, fwd+bwd wall {np.median(wall):.3f} ms/call (median of 5 x 20 unblocked calls)')
" 2>&1 | grep -E "^== | ms |ms/call|Error" | cut -c1-200 | awk 'NR <= 12 || /ms\/call/'
done; done
cd /tmp
PYTHONPATH=/tmp/site:$R/.variants/udb:$R timeout $(t 60) python3 /tmp/nan_check.py $F 2>&1 | grep -E "^==|rep |Error" | cut -c1-400
PYTHONPATH=/tmp/site:$R timeout $(t 60) python3 /tmp/nan_check.py $F 1x2048x1x64x128 2>&1 | grep -E "^==|rep |Error" | cut -c1-400
