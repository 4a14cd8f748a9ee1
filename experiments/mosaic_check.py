"""Issue 12 on a GPU: the Mosaic GPU fused kernels against the Triton fused kernels, one process.

    python experiments/mosaic_check.py --out DIR [--ops delta,delta_gated,gla_scalar,gla_no_decay,gla_perdim]
        [--shape 8x2048x16x128[,BxTxHxKxV...]|none] [--check-shape 1x1024x4x128|none]
        [--backends triton,auto,mosaic_gpu,fla]

Per op (the delta rule ungated and gated, GLA with a scalar decay, without, and with a
per-dimension decay) through the public op with impl="pallas" under PALLAS_KERNELS_GPU=triton
(Triton alone), =auto (the default: `dispatch.takes_mosaic_gpu` picks per op) and =mosaic_gpu (the
fused Mosaic GPU kernels): the output and every gradient against the float32 scan at the check
shape, then fwd and fwd+bwd ms at each timing shape (BxTxHxD, or BxTxHxKxV where K and V differ;
the median of ROUNDS interleaved rounds, each round's median kept); for GLA beside
flash-linear-attention's
`chunk_simple_gla` (scalar or no decay) or `chunk_gla` (per dimension) when it imports.
Rows print as JSON lines and go to DIR/mosaic_check.json after each op.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from experiments.gpu_check_fused import inputs, median_ms, rel

CHUNK = 64
OPS = ("delta", "delta_gated", "gla_scalar", "gla_no_decay", "gla_perdim")
BACKENDS = ("triton", "auto", "mosaic_gpu")
CHOICES = BACKENDS + ("fla",)   # --backends: ours and the peer
ROUNDS, ITERS = 3, 10   # timing: each backend's median of ITERS calls per round, backends in turn


def _op(name, backend):
  """(o, final state) of `name` on the inputs dict x, traced under PALLAS_KERNELS_GPU=backend (or the scan)."""
  impl = "scan" if backend == "scan" else "pallas"

  def f(x):
    os.environ["PALLAS_KERNELS_GPU"] = "auto" if backend == "scan" else backend   # read when the op is traced
    if name.startswith("delta"):
      return pk.delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x.get("g"), initial_state=x["s0"],
                           return_final_state=True, impl=impl, chunk_size=CHUNK)
    return pk.gla(x["q"], x["k"], x["v"], x.get("g"), initial_state=x["s0"], return_final_state=True, impl=impl,
                  chunk_size=CHUNK)
  return f


def _inputs(name, b, t, h, kd, vd, seed=0):
  kind = "delta" if name.startswith("delta") else "gla" if name == "gla_perdim" else "gla_scalar"
  x = inputs(kind, b, t, h, kd, vd, jnp.bfloat16, name == "delta_gated", seed=seed)
  if name == "gla_no_decay":
    x.pop("g")
  return x


def _loss_grads(f, do):
  def loss(x):
    o, s = f(x)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s)
  return jax.jit(jax.grad(loss))


def _dims(shape, option):
  """(B, T, H, K, V) from BxTxHxD (K = V = D) or BxTxHxKxV; a ValueError naming `option` else."""
  parts = shape.split("x")
  if len(parts) not in (4, 5) or not all(p.isdigit() for p in parts):
    raise ValueError(f"{option}: expected BxTxHxD or BxTxHxKxV, got {shape!r}")
  dims = tuple(int(p) for p in parts)
  return dims if len(dims) == 5 else dims + dims[-1:]


def check_rows(report, name, check_shape, backends):
  """Output and every gradient against the float32 scan at check_shape (B, T, H, K, V)."""
  b, t, h, kd, vd = check_shape
  x = _inputs(name, b, t, h, kd, vd, seed=1)
  do = jnp.asarray(np.random.default_rng(2).standard_normal((b, t, h, vd)), jnp.float32)
  x32 = {n: a.astype(jnp.float32) for n, a in x.items()}
  g_ref = _loss_grads(_op(name, "scan"), do)(x32)
  o_ref = _op(name, "scan")(x32)[0]
  for backend in backends:
    row = {"op": name, "backend": backend, "check_shape": list(check_shape)}
    try:
      row["o"] = rel(jax.jit(_op(name, backend))(x)[0], o_ref)
      grads = _loss_grads(_op(name, backend), do)(x)
      row.update({f"d{n}": rel(grads[n], g_ref[n]) for n in grads})
      row["pass"] = all(v < 1e-2 for k, v in row.items() if k == "o" or k.startswith("d"))
    except Exception as e:  # a failing path must not hide the others
      row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
    print(json.dumps(row), flush=True)
    report["check"].append(row)


def timing_rows(report, name, shape, backends, with_fla):
  """fwd and fwd+bwd ms of each of our backends at shape (B, T, H, K, V), in interleaved rounds;
  fla's row beside them for GLA if `with_fla`."""
  b, t, h, kd, vd = shape
  x = _inputs(name, b, t, h, kd, vd)
  do = jnp.asarray(np.random.default_rng(3).standard_normal((b, t, h, vd)), jnp.float32)
  rows, compiled = {}, {}
  for backend in backends:
    rows[backend] = {"op": name, "backend": backend, "shape": list(shape)}
    try:
      compiled[backend] = (jax.jit(lambda x, f=_op(name, backend): f(x)[0]).lower(x).compile(),
                           _loss_grads(_op(name, backend), do).lower(x).compile())
    except Exception as e:
      rows[backend]["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
  # Interleaved rounds: the GPU's clock drifts over a run (run 45 timed one function twice, 0.82 and
  # 0.93 ms, backends in turn), which then shows as the rounds' spread, not as a backend's difference.
  for _ in range(ROUNDS):
    for backend, (fwd, fb) in compiled.items():
      rows[backend].setdefault("fwd_rounds", []).append(median_ms(fwd, x, iters=ITERS))
      rows[backend].setdefault("fwd_bwd_rounds", []).append(median_ms(fb, x, iters=ITERS))
  for row in rows.values():
    if "fwd_rounds" in row:
      row["fwd_ms"], row["fwd_bwd_ms"] = float(np.median(row["fwd_rounds"])), float(np.median(row["fwd_bwd_rounds"]))
    print(json.dumps(row), flush=True)
    report["timing"].append(row)
  if name.startswith("gla") and with_fla:
    report["timing"].append(_fla_gla(name, x, do, shape))


def _fla_gla(name, x, do, shape):
  row = {"op": name, "backend": "fla", "shape": list(shape)}
  try:
    import torch
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla
    t = lambda a, grad=True: torch.tensor(np.asarray(a.astype(jnp.float32)), device="cuda").to(
        torch.bfloat16 if a.dtype == jnp.bfloat16 else torch.float32).requires_grad_(grad)
    q, k, v = t(x["q"]), t(x["k"]), t(x["v"])
    g = torch.tensor(np.asarray(x["g"].astype(jnp.float32)), device="cuda").requires_grad_(True) if "g" in x else None
    s0 = torch.tensor(np.asarray(x["s0"]), device="cuda")
    dot = torch.tensor(np.asarray(do), device="cuda").to(torch.bfloat16)
    fla_op = chunk_gla if name == "gla_perdim" else chunk_simple_gla
    run = lambda: fla_op(q, k, v, g=g, scale=x["q"].shape[-1] ** -0.5, initial_state=s0, output_final_state=True)[0]
    def fb():
      run().backward(dot)
    sync = lambda _: torch.cuda.synchronize()
    row["fwd_ms"] = median_ms(lambda: run(), None, sync=sync, call_with_arg=False)
    row["fwd_bwd_ms"] = median_ms(fb, None, sync=sync, call_with_arg=False)
  except Exception as e:  # the peer is optional
    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
  print(json.dumps(row), flush=True)
  return row


def write(report, out):
  with open(os.path.join(out, "mosaic_check.json"), "w") as f:
    json.dump(report, f, indent=1)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {OPS}")
  ap.add_argument("--shape", default="8x2048x16x128", help="comma-separated timing shapes, BxTxHxD or BxTxHxKxV, or none")
  ap.add_argument("--check-shape", default="1x1024x4x128", help="BxTxHxD or BxTxHxKxV, or none: no agreement rows")
  ap.add_argument("--backends", default=",".join(CHOICES),
                  help=f"comma-separated, of {CHOICES} (fla: the peer, for the GLA ops)")
  args = ap.parse_args(argv)
  backends = tuple(args.backends.split(","))
  if unknown := [backend for backend in backends if backend not in CHOICES]:
    ap.error(f"--backends: unknown {unknown}; expected some of {CHOICES}")
  ops = args.ops.split(",")
  unknown = [o for o in ops if o not in OPS]
  if unknown:
    ap.error(f"--ops: unknown {unknown}; expected some of {OPS}")
  try:
    shapes = [] if args.shape == "none" else [_dims(shape, "--shape") for shape in args.shape.split(",")]
    check_shape = None if args.check_shape == "none" else _dims(args.check_shape, "--check-shape")
  except ValueError as e:
    ap.error(str(e))
  os.makedirs(args.out, exist_ok=True)
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "check": [], "timing": []}
  ours = tuple(backend for backend in backends if backend != "fla")
  for name in ops:
    if check_shape is not None:
      check_rows(report, name, check_shape, ours)
    for shape in shapes:
      timing_rows(report, name, shape, ours, "fla" in backends)
    write(report, args.out)
  return report


if __name__ == "__main__":
  main()
