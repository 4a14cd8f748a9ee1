"""Issue 12 on a GPU: the Mosaic GPU fused kernels against the Triton fused kernels, one process.

    python experiments/mosaic_check.py --out DIR [--shape 8x2048x16x128] [--check-shape 1x1024x4x128]

1. Scalar-decay and undecayed GLA through `pk.gla(impl="pallas")` under PALLAS_KERNELS_GPU=triton
   (Triton alone), =auto (the default: on Hopper the Mosaic GPU kernels, `dispatch.takes_mosaic_gpu`) and =mosaic_gpu
   (the fused Mosaic GPU forward and backward): output and gradients
   against the float32 scan at the check shape, then fwd and fwd+bwd median ms at the timing shape,
   beside flash-linear-attention's `chunk_simple_gla` when it imports.
2. The fused Mosaic GPU delta-rule forward (`delta_kernels_mosaic_gpu.forward`, gated and not)
   against the Triton fused forward: agreement and forward ms.
Rows print as JSON lines and go to DIR/mosaic_check.json after each step.
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
from pallas_kernels.common import chunk_kernels_triton, delta_kernels_mosaic_gpu

CHUNK = 64


def _gla(backend, with_decay):
  def f(x):
    os.environ["PALLAS_KERNELS_GPU"] = backend   # read when the op is traced
    g = x["g"] if with_decay else None
    return pk.gla(x["q"], x["k"], x["v"], g, initial_state=x["s0"], return_final_state=True,
                  impl="scan" if backend == "scan" else "pallas", chunk_size=CHUNK)
  return f


def _loss_grads(f, do):
  def loss(x):
    o, s = f(x)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s)
  return jax.jit(jax.grad(loss))


def gla_rows(report, check_shape, shape, out):
  for with_decay in (True, False):
    name = "gla_scalar" if with_decay else "gla_no_decay"
    b, t, h, d = check_shape
    x = inputs("gla_scalar", b, t, h, d, d, jnp.bfloat16, None, seed=1)
    do = jnp.asarray(np.random.default_rng(2).standard_normal((b, t, h, d)), jnp.float32)
    x32 = {n: a.astype(jnp.float32) for n, a in x.items()}
    g_ref = _loss_grads(_gla("scan", with_decay), do)(x32)
    o_ref = _gla("scan", with_decay)(x32)[0]
    for backend in ("triton", "auto", "mosaic_gpu"):
      row = {"op": name, "backend": backend, "check_shape": list(check_shape)}
      try:
        row["o"] = rel(jax.jit(_gla(backend, with_decay))(x)[0], o_ref)
        grads = _loss_grads(_gla(backend, with_decay), do)(x)
        row.update({f"d{n}": rel(grads[n], g_ref[n]) for n in grads if n != "g" or with_decay})
        row["pass"] = all(v < 1e-2 for k, v in row.items() if k == "o" or k.startswith("d"))
      except Exception as e:  # a failing path must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
      print(json.dumps(row), flush=True)
      report["check"].append(row)
    b, t, h, d = shape
    x = inputs("gla_scalar", b, t, h, d, d, jnp.bfloat16, None)
    do = jnp.asarray(np.random.default_rng(3).standard_normal((b, t, h, d)), jnp.float32)
    for backend in ("triton", "auto", "mosaic_gpu"):
      row = {"op": name, "backend": backend, "shape": list(shape)}
      try:
        fwd = jax.jit(lambda x, f=_gla(backend, with_decay): f(x)[0]).lower(x).compile()
        fb = _loss_grads(_gla(backend, with_decay), do).lower(x).compile()
        row["fwd_ms"] = median_ms(fwd, x)
        row["fwd_bwd_ms"] = median_ms(fb, x)
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
      print(json.dumps(row), flush=True)
      report["timing"].append(row)
    report["timing"].append(_fla_simple_gla(name, x, do, with_decay))
    write(report, out)


def _fla_simple_gla(name, x, do, with_decay):
  row = {"op": name, "backend": "fla", "shape": list(x["q"].shape) }
  try:
    import torch
    from fla.ops.simple_gla import chunk_simple_gla
    t = lambda a, grad=True: torch.tensor(np.asarray(a.astype(jnp.float32)), device="cuda").to(
        torch.bfloat16 if a.dtype == jnp.bfloat16 else torch.float32).requires_grad_(grad)
    q, k, v = t(x["q"]), t(x["k"]), t(x["v"])
    g = torch.tensor(np.asarray(x["g"].astype(jnp.float32)), device="cuda").requires_grad_(True) if with_decay else None
    s0 = torch.tensor(np.asarray(x["s0"]), device="cuda")
    dot = torch.tensor(np.asarray(do), device="cuda").to(torch.bfloat16)
    run = lambda: chunk_simple_gla(q, k, v, g=g, scale=x["q"].shape[-1] ** -0.5, initial_state=s0,
                                   output_final_state=True)[0]
    def fb():
      run().backward(dot)
    sync = lambda _: torch.cuda.synchronize()
    row["fwd_ms"] = median_ms(lambda: run(), None, sync=sync, call_with_arg=False)
    row["fwd_bwd_ms"] = median_ms(fb, None, sync=sync, call_with_arg=False)
  except Exception as e:  # the peer is optional
    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
  print(json.dumps(row), flush=True)
  return row


def delta_rows(report, shape, out):
  b, t, h, d = shape
  for gated in (False, True):
    x = inputs("delta", b, t, h, d, d, jnp.bfloat16, gated)
    s0 = x["s0"].reshape(b * h, d, d)
    common = dict(scale=d ** -0.5, chunk=CHUNK, store_states=False)
    g = x.get("g")
    paths = {"triton": lambda x, s0: chunk_kernels_triton.forward(x["q"], x["k"], x["v"], x["beta"], g, s0, None,
                                                                    **common)[:2],
             "mosaic_gpu": lambda x, s0: delta_kernels_mosaic_gpu.forward(x["q"], x["k"], x["v"], x["beta"], g, s0,
                                                                          **common)[:2]}
    row = {"op": "delta_gated" if gated else "delta", "shape": list(shape), "mode": "fwd"}
    try:
      fns = {n: jax.jit(f).lower(x, s0).compile() for n, f in paths.items()}
      ref, res = fns["triton"](x, s0), fns["mosaic_gpu"](x, s0)
      row.update(o_vs_triton=rel(res[0], ref[0]), final_vs_triton=rel(res[1], ref[1]))
      for n, fn in fns.items():
        row[f"{n}_fwd_ms"] = median_ms(lambda fn=fn: fn(x, s0), None, call_with_arg=False)
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
    print(json.dumps(row), flush=True)
    report["delta_forward"].append(row)
    write(report, out)


def write(report, out):
  with open(os.path.join(out, "mosaic_check.json"), "w") as f:
    json.dump(report, f, indent=1)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--shape", default="8x2048x16x128")
  ap.add_argument("--check-shape", default="1x1024x4x128")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  dims = lambda s: tuple(int(v) for v in s.split("x"))
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "check": [], "timing": [],
            "delta_forward": []}
  delta_rows(report, dims(args.shape), args.out)
  gla_rows(report, dims(args.check_shape), dims(args.shape), args.out)


if __name__ == "__main__":
  main()
