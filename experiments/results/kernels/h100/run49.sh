# Session 18 (issue 12): run 48's agreement check at the Rodimus shape 1x2048x1x64x2048 gave dg NaN
# on the Mosaic GPU per-dim kernels (o, dq, dk, dv, ds0 passed; 1x1024x4x128 passed everything; run
# 47's kernels passed this shape on the H100; Mosaic GPU interpret mode on the CPU gives no NaN at
# this shape). Bisect: the kernels' gradients at that shape from run 47's pallas_kernels (38b998a,
# .variants/run47), session 17's (6da45e1, .variants/r47regs) and this tree, with where dg is not
# finite (rows within the chunk, chunks) and three repeats (a race shows as varying counts); then
# this tree at neighbouring shapes. No scan reference (device time: 628 s left): counts and max |grad|. Carry: .whl, .variants.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PALLAS_KERNELS_GPU=mosaic_gpu
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
F=1x2048x1x64x2048
cd /tmp
for v in run47 r47regs; do
  PYTHONPATH=/tmp/site:$R/.variants/$v:$R timeout 60 python3 /tmp/nan_check.py $F 2>&1 | grep -E "^==|rep |Error" | cut -c1-400
done
PYTHONPATH=/tmp/site:$R timeout 120 python3 /tmp/nan_check.py $F 1x2048x1x64x128 1x256x1x64x2048 1x1024x1x128x2048 \
  2>&1 | grep -E "^==|rep |Error" | cut -c1-400
