"""GPU check of the fused delta-rule kernels (pallas_kernels/common/chunk_kernels_triton.py).

    python experiments/gpu_check_fused.py [--out DIR] [--params '{"DQK_PARAMS": [8, 1]}'] [--skip-check]
                                          [--sweep '[{}, {"DQK_PARAMS": [4, 1]}]'] [--stages '[{}]']

(a) agreement: the fused path (float32 and bf16) and the Mosaic GPU state-pass path (bf16) vs
    impl="scan" (float32 reference) at 1x1024x4x128x128, delta rule ungated and gated, GLA with a
    scalar and a per-dimension decay: relative error of o, the final state and
    every gradient (q, k, v, beta, g, initial state).
(b) timing: fwd and fwd+bwd (jitted, median of 20 after 3 warm-up calls, block_until_ready) of
    impl="chunk", the older Pallas path ("state_pass": Triton kernels over XLA terms; "mosaic_gpu":
    the same with the Mosaic GPU kernels, jax >= 0.11) and the fused kernels, bf16 8x2048x16x128
    (--shapes: BxTxHxD or BxTxHxKxV): delta rule ungated and gated, GLA per-dim decay and GLA
    scalar decay; plus compiled temp memory;
    and flash-linear-attention's kernel for each (when torch and fla import), in the same process.
(c) with --sweep: the fused paths' fwd+bwd at each of --shapes for each set of kernel constants;
    with --stages: the fused delta rule's stages, each timed alone, for each set.
(d) with --mosaic-fused: the fused Mosaic GPU GLA forward (chunk_kernels_mosaic_gpu, scalar decay)
    against the fused Triton forward, kernel calls alone at --shapes (bf16): agreement of o, the
    final state and the stored states, and the forward's time with and without stored states.
Writes gpu_check_fused.json into --out (default $OUT, else experiments/results/kernels).
`--params` overrides the kernels' constants ((num_warps, num_stages) per kernel, value-block
widths), e.g. to tune them; `--skip-check` times only.
Runs in about 2-3 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels.common import chunk_kernels_mosaic_gpu, chunk_kernels_triton, state_pass_mosaic_gpu
from pallas_kernels.ops.delta_rule.pallas import delta_rule_fused, delta_rule_state_pass
from pallas_kernels.ops.gla.pallas import gla_fused, gla_state_pass

CHUNK = 64
SMOKE = False  # --smoke: tiny shapes and interpret mode, to try the script on a CPU


def inputs(op, b, t, h, kd, vd, dtype, gated, seed=0):
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((b, t, h, kd), np.float32)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  x = {"q": rng.standard_normal((b, t, h, kd), np.float32), "k": k,
       "v": rng.standard_normal((b, t, h, vd), np.float32)}
  logsig = lambda a: -np.log1p(np.exp(-a))
  if op == "delta":
    x["beta"] = 1 / (1 + np.exp(-rng.standard_normal((b, t, h)).astype(np.float32)))
    if gated:
      x["g"] = logsig(rng.standard_normal((b, t, h)).astype(np.float32))
  elif op == "gla_scalar":
    x["g"] = logsig(rng.standard_normal((b, t, h)).astype(np.float32))
  else:  # "gla": per-dimension decay
    x["g"] = logsig(rng.standard_normal((b, t, h, kd)).astype(np.float32))
  x["s0"] = 0.1 * rng.standard_normal((b, h, kd, vd)).astype(np.float32)
  return {n: jnp.asarray(a, jnp.float32 if n == "s0" else dtype) for n, a in x.items()}


def _backend(impl):
  """The state-pass kernels' backend: "state_pass" Triton, "mosaic_gpu" Mosaic GPU."""
  if impl == "mosaic_gpu":
    return "mosaic_gpu_interpret" if SMOKE else "mosaic_gpu"
  return "interpret" if SMOKE else "triton"


def mosaic_gpu_ok():
  return state_pass_mosaic_gpu.supports(jnp.bfloat16, CHUNK, 128, 128) is None


def delta_fn(impl):
  """(x) -> (o, final state) for one delta-rule path."""
  def f(x):
    kd = x["q"].shape[-1]
    g = x.get("g")
    if impl in ("scan", "chunk", "pallas"):
      return pk.delta_rule(x["q"], x["k"], x["v"], x["beta"], g=g, initial_state=x["s0"],
                           return_final_state=True, impl=impl, chunk_size=CHUNK)
    common = dict(scale=kd ** -0.5, s0=x["s0"], segment_ids=None, chunk_size=CHUNK)
    if impl == "fused":
      return delta_rule_fused(x["q"], x["k"], x["v"], x["beta"], g, interpret=SMOKE, **common)
    return delta_rule_state_pass(x["q"], x["k"], x["v"], x["beta"], g, backend=_backend(impl), **common)
  return f


def gla_fn(impl):
  def f(x):
    if impl in ("scan", "chunk", "pallas"):
      return pk.gla(x["q"], x["k"], x["v"], x["g"], initial_state=x["s0"], return_final_state=True,
                    impl=impl, chunk_size=CHUNK)
    kd = x["q"].shape[-1]
    common = dict(scale=kd ** -0.5, s0=x["s0"], segment_ids=None, chunk_size=CHUNK)
    if impl == "fused":
      return gla_fused(x["q"], x["k"], x["v"], x["g"], interpret=SMOKE, **common)
    return gla_state_pass(x["q"], x["k"], x["v"], x["g"], backend=_backend(impl), **common)
  return f


def rel(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def value_and_grads(f, x, cts):
  out, vjp = jax.vjp(f, x)
  (d,) = vjp(tuple(c.astype(o.dtype) for c, o in zip(cts, out)))
  return out, d


CHECK_OPS = {"delta": ("delta", False), "gated_delta": ("delta", True), "gla_scalar": ("gla_scalar", True),
             "gla": ("gla", None)}


def check(report, check_impls, check_ops=tuple(CHECK_OPS)):
  """Each kernel path vs the float32 scan: the fused Triton kernels (float32 and bf16) and the
  Mosaic GPU state-pass kernels (bf16 only: wgmma has no float32 beyond TF32), for the ops named
  in `check_ops` (keys of CHECK_OPS)."""
  b, t, h, d = (1, 100, 2, 64) if SMOKE else (1, 1024, 4, 128)
  rows = []
  for op, gated in (CHECK_OPS[name] for name in check_ops):
    fn = delta_fn if op == "delta" else gla_fn
    for dtype in (jnp.float32, jnp.bfloat16):
      impls = ["fused"]
      if dtype == jnp.bfloat16 and mosaic_gpu_ok():
        impls.append("mosaic_gpu")
      impls = [i for i in impls if i in check_impls]
      if not impls:
        continue
      x = inputs(op, b, t, h, d, d, dtype, gated, seed=1)
      rng = np.random.default_rng(2)
      cts = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32),
             jnp.asarray(rng.standard_normal((b, h, d, d)), jnp.float32))
      x32 = {n: a.astype(jnp.float32) for n, a in x.items()}
      (o_r, s_r), d_r = jax.jit(lambda x: value_and_grads(fn("scan"), x, cts))(x32)
      for impl in impls:
        (o, s), dx = jax.jit(lambda x, impl=impl: value_and_grads(fn(impl), x, cts))(x)
        row = {"op": "gated_delta" if gated and op == "delta" else op, "impl": impl,
               "dtype": jnp.dtype(dtype).name, "shape": [b, t, h, d, d], "o": rel(o, o_r),
               "final_state": rel(s, s_r)}
        row.update({f"d{n}": rel(dx[n], d_r[n]) for n in x})
        row["max"] = max(v for k, v in row.items() if k not in ("op", "impl", "dtype", "shape"))
        row["tol"] = 1e-4 if dtype == jnp.float32 else 1e-2
        row["ok"] = bool(np.isfinite(row["max"]) and row["max"] < row["tol"])
        print(json.dumps(row), flush=True)
        rows.append(row)
  report["agreement"] = rows


def median_ms(fn, arg, iters=20, warmup=3, sync=jax.block_until_ready, call_with_arg=True):
  """fn: a compiled (or jitted) function of one argument (or of none)."""
  call = (lambda: fn(arg)) if call_with_arg else fn
  for _ in range(warmup):
    sync(call())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    sync(call())
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def temp_mb(compiled):
  try:
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  except Exception as e:  # best effort
    return f"n/a ({type(e).__name__})"


def default_cases():
  mosaic = ("mosaic_gpu",) if mosaic_gpu_ok() else ()
  return {"delta": ("chunk", "state_pass", "fused") + mosaic + ("fla",),
          "delta_gated": ("state_pass", "fused") + mosaic + ("fla",),
          "gla": ("chunk", "state_pass", "fused") + mosaic + ("fla",),
          "gla_scalar": ("state_pass", "fused") + mosaic + ("fla",)}


def parse_cases(text):
  """'delta:fused,fla;gla_scalar:fused' -> {"delta": ("fused", "fla"), "gla_scalar": ("fused",)}"""
  cases, ops = {}, sorted(default_cases())
  for part in text.split(";"):
    op, impls = part.split(":")
    if op not in ops:
      raise ValueError(f"--cases: unknown op {op!r} (expected one of {ops})")
    cases[op] = tuple(impls.split(","))
  return cases


def bench(report, cases, shapes, out):
  rows = report.setdefault("timing", [])
  for shape in shapes:
    _bench_shape(rows, cases, *shape)
    write_report(report, out)


def case(name):
  """A case name of `default_cases` -> (op of `inputs`, gated, path name -> the path's function)."""
  if name.startswith("delta"):
    return "delta", name == "delta_gated", delta_fn
  return name, None, gla_fn


def _bench_shape(rows, cases, b, t, h, kd, vd):
  for name, impls in cases.items():
    op, gated, fn = case(name)
    x = inputs(op, b, t, h, kd, vd, jnp.bfloat16, gated)
    do = jnp.asarray(np.random.default_rng(3).standard_normal((b, t, h, vd)), jnp.bfloat16)
    for impl in impls:
      if impl == "fla" and SMOKE:
        continue
      row = {"op": op + ("_gated" if gated else ""), "impl": impl, "shape": [b, t, h, kd, vd], "dtype": "bfloat16"}
      if impl == "fla":
        time_fla(op, x, do, row)
        print(json.dumps(row), flush=True)
        rows.append(row)
        continue
      f = fn(impl)
      o_only = lambda x, f=f: f(x)[0]
      try:
        t0 = time.time()
        fwd = jax.jit(o_only).lower(x).compile()
        fwd_bwd = jax.jit(lambda x, f=o_only: jax.vjp(f, x)[1](do)).lower(x).compile()
        row["compile_s"] = time.time() - t0
        row["fwd_ms"] = median_ms(fwd, x)
        row["fwd_bwd_ms"] = median_ms(fwd_bwd, x)
        row["fwd_temp_mb"] = temp_mb(fwd)
        row["fwd_bwd_temp_mb"] = temp_mb(fwd_bwd)
      except Exception as e:  # keep going: one failing path must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
      print(json.dumps(row), flush=True)
      rows.append(row)


PARAM_NAMES = ("WY_PARAMS", "FORWARD_PARAMS", "STATE_GRAD_PARAMS", "DQK_PARAMS", "WY_GRAD_PARAMS",
               "GRAD_BLOCK_K", "GRAD_BLOCK_V", "STATE_BLOCK_V", "SPLIT_OUTPUT", "OUTPUT_PARAMS",
               "BF16_GRAD_OPERANDS", "SCORE_UNROLL", "SCORES_PARAMS", "SCORES_GRAD_PARAMS", "SCORES_BLOCK_K",
               "SCORES_GRAD_BLOCK_K", "PALLAS_CUMSUM", "CUMSUM_PARAMS", "CUMSUM_BLOCK_K", "SCORES_DIAGONAL_MATMUL")


def kernel_params():
  return {n: getattr(chunk_kernels_triton, n) for n in PARAM_NAMES}


def set_params(params):
  for name, value in params.items():
    assert name in PARAM_NAMES, name
    setattr(chunk_kernels_triton, name, tuple(value) if isinstance(value, list) else value)


def fla_fns(op, x, do):
  """fwd, fwd+bwd and sync of flash-linear-attention's kernel for the same inputs (bf16 torch)."""
  import torch
  to_t = lambda a: torch.from_dlpack(np.asarray(a.astype(jnp.float32))).cuda().to(torch.bfloat16).requires_grad_()
  t = {n: to_t(a) for n, a in x.items() if n != "s0"}
  s0 = torch.from_dlpack(np.asarray(x["s0"])).cuda().requires_grad_()
  if op == "delta" and "g" in t:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    call = lambda: chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"].float(), t["beta"], initial_state=s0)[0]
  elif op == "delta":
    from fla.ops.delta_rule import chunk_delta_rule
    call = lambda: chunk_delta_rule(t["q"], t["k"], t["v"], t["beta"], initial_state=s0)[0]
  elif op == "gla_scalar":
    from fla.ops.simple_gla import chunk_simple_gla
    call = lambda: chunk_simple_gla(t["q"], t["k"], t["v"], t["g"].float(), initial_state=s0)[0]
  else:
    from fla.ops.gla import chunk_gla
    call = lambda: chunk_gla(t["q"], t["k"], t["v"], t["g"], initial_state=s0)[0]
  params = [a for a in t.values()] + [s0]
  do_t = torch.from_dlpack(np.asarray(do.astype(jnp.float32))).cuda().to(torch.bfloat16)

  def fwd(_):
    with torch.no_grad():
      return call()

  def fwd_bwd(_):
    return torch.autograd.grad(call(), params, do_t, allow_unused=True)

  return fwd, fwd_bwd, lambda _: torch.cuda.synchronize()


def time_fla(op, x, do, row):
  try:
    import torch  # noqa: F401
    fwd, fwd_bwd, sync = fla_fns(op, x, do)
    row["fwd_ms"] = median_ms(fwd, None, sync=sync)
    row["fwd_bwd_ms"] = median_ms(fwd_bwd, None, sync=sync)
  except Exception as e:  # fla is a peer: its absence must not stop the run
    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"


def mosaic_fused_forward(report, shapes, out):
  """(d): `chunk_kernels_mosaic_gpu.forward` vs `chunk_kernels_triton.forward`, GLA scalar decay."""
  rows = report.setdefault("mosaic_fused_forward", [])
  for b, t, h, kd, vd in shapes:
    x = inputs("gla_scalar", b, t, h, kd, vd, jnp.bfloat16, True)
    s0 = x["s0"].reshape(b * h, kd, vd)
    common = dict(scale=kd ** -0.5, chunk=CHUNK, interpret=SMOKE)
    for store in (False, True):
      paths = {"triton": lambda x, s0, store=store: chunk_kernels_triton.forward(
                   x["q"], x["k"], x["v"], None, x["g"], s0, None, store_states=store, **common),
               "mosaic_gpu": lambda x, s0, store=store: chunk_kernels_mosaic_gpu.forward(
                   x["q"], x["k"], x["v"], x["g"], s0, store_states=store, **common)}
      row = {"op": "gla_scalar", "shape": [b, t, h, kd, vd], "store_states": store}
      try:
        fns = {name: jax.jit(f).lower(x, s0).compile() for name, f in paths.items()}
        ref, res = fns["triton"](x, s0), fns["mosaic_gpu"](x, s0)
        row.update(o=rel(res[0], ref[0]), final_state=rel(res[1], ref[1]))
        if store:   # the Triton path's third output is a tuple whose first entry is the states
          row["states"] = rel(res[2], ref[2][0])
        for name, fn in fns.items():
          row[f"{name}_fwd_ms"] = median_ms(lambda: fn(x, s0), None, call_with_arg=False)
      except Exception as e:  # keep going: a failing kernel must not hide the other rows
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
      print(json.dumps(row), flush=True)
      rows.append(row)
    write_report(report, out)


def sweep(report, param_sets, shapes, out, ops=("delta", "delta_gated", "gla_scalar", "gla")):
  """The fused path's fwd and fwd+bwd (the ops of `ops` that have fused kernels) at each shape for
  each set of kernel constants; the report is written after every row (a run cut off keeps them)."""
  default = kernel_params()
  rows = report.setdefault("sweep", [])
  names = [op for op in ("delta", "delta_gated", "gla_scalar", "gla") if op in ops]
  for b, t, h, kd, vd in [(1, 128, 2, 16, 16)] if SMOKE else shapes:
    do = jnp.asarray(np.random.default_rng(3).standard_normal((b, t, h, vd)), jnp.bfloat16)
    for name in names:
      op, gated, fn = case(name)
      x = inputs(op, b, t, h, kd, vd, jnp.bfloat16, gated)
      for params in param_sets:
        set_params(default)
        set_params(params)
        f = fn("fused")
        row = {"op": name, "shape": [b, t, h, kd, vd], "params": params}
        try:
          fwd = jax.jit(lambda x, f=f: f(x)[0]).lower(x).compile()
          fb = jax.jit(lambda x, f=f: jax.vjp(lambda x: f(x)[0], x)[1](do)).lower(x).compile()
          row["fwd_ms"] = median_ms(fwd, x)
          row["fwd_bwd_ms"] = median_ms(fb, x)
        except Exception as e:
          row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_report(report, out)
  set_params(default)


def stages(b, t, h, d, op="delta"):
  """ms of each stage of the fused delta rule (ungated) or, op "gla", of per-dimension GLA (bf16),
  run alone, at the current kernel constants."""
  ck = chunk_kernels_triton
  x = inputs(op, b, t, h, d, d, jnp.bfloat16, False)
  do = jnp.asarray(np.random.default_rng(3).standard_normal((b, t, h, d)), jnp.bfloat16)
  common = dict(scale=d ** -0.5, chunk=CHUNK, interpret=SMOKE)
  s0 = x["s0"].reshape(b * h, d, d)
  fns, arrays = gla_stage_fns(x, do, s0, common) if op == "gla" else (delta_stage_fns(x, do, s0, common), None)
  out = {}
  for name, fn in fns.items():
    try:
      if arrays is None:
        out[name] = median_ms(jax.jit(fn).lower().compile(), None, call_with_arg=False)
      else:   # arguments, not constants: XLA would constant-fold the XLA parts of a closure (run 11)
        out[name] = median_ms(jax.jit(fn).lower(arrays).compile(), arrays)
    except Exception as e:
      out[name] = f"{type(e).__name__}: {str(e)[:500]}"
    print(json.dumps({"op": op, "stage": name, "ms": out[name]}), flush=True)
  return out


def delta_stage_fns(x, do, s0, common):
  ck = chunk_kernels_triton
  beta = x["beta"].astype(jnp.float32)
  _, _, saved = ck.forward(x["q"], x["k"], x["v"], beta, None, s0, None, store_states=True, **common)
  s_in, w, xx, t_inv, _ = saved
  ds_out, _, dx = ck.state_grads(x["q"], x["k"], w, None, None, do, s0, **common)
  t_dtype = None if t_inv is None else t_inv.dtype
  return {
      "wy alone": lambda: ck.wy(x["k"], x["v"], beta, None, None, chunk=CHUNK, t_dtype=t_dtype,
                                interpret=SMOKE),
      "forward (wy + state pass, storing)": lambda: ck.forward(x["q"], x["k"], x["v"], beta, None, s0, None,
                                                               store_states=True, **common),
      "state_grads": lambda: ck.state_grads(x["q"], x["k"], w, None, None, do, s0, **common),
      "chunk_grads (dqk + wy_grad)": lambda: ck.chunk_grads(x["q"], x["k"], x["v"], beta, None, None, do, s_in,
                                                            ds_out, xx, dx, t_inv, **common),
      "dqk only (the GLA form)": lambda: ck.chunk_grads(x["q"], x["k"], x["v"], None, None, None, do, s_in,
                                                         ds_out, None, dx.astype(jnp.bfloat16), None, **common),
  }


def gla_stage_fns(x, do, s0, common):
  """Per-dimension GLA: each kernel stage, as functions of one dict of arrays (and that dict)."""
  ck = chunk_kernels_triton
  a = dict(q=x["q"], k=x["k"], v=x["v"], g=x["g"].astype(jnp.float32), do=do, s0=s0)
  a["cum_g"] = ck.chunk_cumsum(a["g"], CHUNK, SMOKE)
  _, _, (a["s_in"], _, _, _, a["decayed"], _) = ck.forward(a["q"], a["k"], a["v"], None, a["g"], s0, None,
                                                        store_states=True, **common)
  a["ds_out"], _, a["dv"] = ck.state_grads(None, None, None, None, None, do, s0, decayed=a["decayed"], **common)
  fns = {
      "scores": lambda a: ck.scores(a["q"], a["k"], a["cum_g"], None, chunk=CHUNK, interpret=SMOKE),
      "forward (scores + state pass + output)": lambda a: ck.forward(a["q"], a["k"], a["v"], None, a["g"], a["s0"],
                                                                     None, store_states=True, **common),
      "state_grads": lambda a: ck.state_grads(None, None, None, None, None, a["do"], a["s0"], decayed=a["decayed"],
                                              **common),
      "chunk_grads (dqk + scores_grad)": lambda a: ck.chunk_grads(a["q"], a["k"], a["v"], None, a["cum_g"], None,
                                                                  a["do"], a["s_in"], a["ds_out"], None, a["dv"],
                                                                  None, **common),
  }
  return fns, a


def stage_sets(report, param_sets, out, ops=("delta",)):
  """`stages` at 8x2048x16x128 for each set of kernel constants and each op of `ops`."""
  default = kernel_params()
  rows = report.setdefault("stage_sets", [])
  for params in param_sets:
    set_params(default)
    set_params(params)
    for op in ops:
      rows.append({"op": op, "params": params,
                   "ms": stages(*((1, 128, 2, 16) if SMOKE else (8, 2048, 16, 128)), op=op)})
    write_report(report, out)
  set_params(default)


def parse_shape(text):
  """'8x2048x16x128' -> (8, 2048, 16, 128, 128); 'BxTxHxKxV' for K != V."""
  dims = tuple(int(n) for n in text.split("x"))
  if len(dims) not in (4, 5):
    raise ValueError(f"--shapes: expected BxTxHxD or BxTxHxKxV, got {text!r}")
  return dims if len(dims) == 5 else (*dims, dims[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernels"))
  ap.add_argument("--params", default=None,
                  help='JSON of chunk_kernels_triton constants, e.g. {"DQK_PARAMS": [4, 2], "STATE_BLOCK_V": 32}')
  ap.add_argument("--skip-check", action="store_true")
  ap.add_argument("--skip-bench", action="store_true")
  ap.add_argument("--sweep", default=None,
                  help='JSON list of constant sets to time the fused paths with at --shapes, e.g. [{}, {"DQK_PARAMS": [4, 2]}]')
  ap.add_argument("--stages", default=None,
                  help="JSON list of constant sets to time the fused delta rule's stages with (8x2048x16x128)")
  ap.add_argument("--stages-ops", default="delta", help="ops whose stages --stages times: delta, gla (per-dim)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
  ap.add_argument("--cases", default=None,
                  help="ops and paths to time, e.g. 'delta:fused,fla;gla_scalar:state_pass,fused' (default: all)")
  ap.add_argument("--shapes", default="8x2048x16x128", help="comma-separated BxTxHxD timing shapes")
  ap.add_argument("--mosaic-fused", action="store_true",
                  help="(d): the fused Mosaic GPU GLA forward (scalar decay) against the Triton one at --shapes")
  ap.add_argument("--check-impls", default="fused,mosaic_gpu",
                  help="the paths the agreement check runs (comma-separated: fused, mosaic_gpu)")
  ap.add_argument("--check-ops", default=",".join(CHECK_OPS),
                  help=f"the ops the agreement check runs (comma-separated: {', '.join(CHECK_OPS)}; gla is per-dim)")
  args = ap.parse_args()
  unknown = set(args.check_ops.split(",")) - set(CHECK_OPS)
  if unknown:
    ap.error(f"--check-ops: unknown {sorted(unknown)}, expected some of {list(CHECK_OPS)}")
  global SMOKE
  SMOKE = args.smoke
  report = {"device": str(jax.devices()[0]), "jax": jax.__version__}
  if args.params:
    set_params(json.loads(args.params))
    report["params"] = json.loads(args.params)
  report["kernel_params"] = kernel_params()
  cases = parse_cases(args.cases) if args.cases else default_cases()
  shapes = [parse_shape(s) for s in args.shapes.split(",")]
  if SMOKE:
    shapes = [(1, 128, 2, 64, 64)]
  t0 = time.time()
  if not args.skip_check:
    check(report, args.check_impls.split(","), args.check_ops.split(","))
    write_report(report, args.out)
  if not args.skip_bench:
    bench(report, cases, shapes, args.out)
  if args.mosaic_fused:
    mosaic_fused_forward(report, shapes, args.out)
  if args.sweep:
    sweep(report, json.loads(args.sweep), shapes, args.out, *([tuple(cases)] if args.cases else []))
  if args.stages:
    stage_sets(report, json.loads(args.stages), args.out, args.stages_ops.split(","))
  report["wall_s"] = time.time() - t0
  path = write_report(report, args.out)
  print("wrote", path, f"({report['wall_s']:.0f} s)")


def write_report(report, out):
  """Written after every section, so a run cut off by its time limit keeps what it measured."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "gpu_check_fused.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  return path


if __name__ == "__main__":
  main()


NAME, FILE = "kernels", "gpu_check_fused.json"


def markdown(results_dir: str) -> str:
  """README table: fwd / fwd+bwd ms and compiled temp memory of each path at each timing shape,
  with the ratio to flash-linear-attention's kernel timed in the same run."""
  import json  # noqa: PLC0415
  with open(os.path.join(results_dir, FILE)) as f:
    res = json.load(f)
  ops = {"delta": "delta rule", "delta_gated": "gated delta rule", "gla": "GLA per-dim decay",
         "gla_scalar": "GLA scalar decay"}
  names = {"chunk": "chunk (XLA)", "state_pass": "pallas: state-pass kernels + XLA terms",
           "mosaic_gpu": "pallas: Mosaic GPU state-pass kernels + XLA terms", "fla": "flash-linear-attention 0.6.0",
           "fused": "pallas: fused kernels"}
  key = lambda t: (t["op"], tuple(t["shape"]), t.get("run"))
  peer = {key(t): t["fwd_bwd_ms"] for t in res["timing"] if t["impl"] == "fla" and "fwd_bwd_ms" in t}
  lines = [f"Recurrence kernels ({res.get('device')}, jax {res.get('jax')}; bf16, median of 20; fla timed in the "
           "same run; commands in the file's `runs`):", "",
           "| op | B x T x H x K x V | path | run | fwd ms | fwd+bwd ms | fwd+bwd temp MB | fwd+bwd / fla |",
           "|---|---|---|---|---|---|---|---|"]
  no_peer_bwd = set()
  for t in res["timing"]:
    if t["impl"] == "fla" and "fwd_bwd_ms" not in t:
      no_peer_bwd.add(ops.get(t["op"], t["op"]))
    if "fwd_ms" not in t:
      continue
    ratio = f"{t['fwd_bwd_ms'] / peer[key(t)]:.2f}x" if key(t) in peer and "fwd_bwd_ms" in t else "-"
    temp = t.get("fwd_bwd_temp_mb")
    temp = f"{temp:.0f}" if isinstance(temp, (int, float)) else "-"
    fwd_bwd = f"{t['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in t else "-"
    lines.append(f"| {ops.get(t['op'], t['op'])} | {'x'.join(map(str, t['shape']))} | {names.get(t['impl'], t['impl'])} | "
                 f"{t.get('run', '')} | {t['fwd_ms']:.2f} | {fwd_bwd} | {temp} | {ratio} |")
  chunk = {key(t): t["fwd_bwd_ms"] for t in res["timing"] if t["impl"] == "chunk" and "fwd_bwd_ms" in t}
  for t in res["timing"]:
    if t["impl"] == "fused" and key(t) in chunk and "fwd_bwd_ms" in t:
      lines += ["", f"{ops.get(t['op'], t['op'])} {'x'.join(map(str, t['shape']))}, run {t['run']}: the fused kernels' "
                f"fwd+bwd is {chunk[key(t)] / t['fwd_bwd_ms']:.1f}x faster than the XLA chunk path in the same process."]
  at_defaults = [x for x in res.get("sweep", []) if x.get("params") == {} and "fwd_bwd_ms" in x]
  latest = {}      # op -> the last run that timed it at the defaults of its day
  for x in at_defaults:
    latest[x["op"]] = max(latest.get(x["op"], 0), int(x["run"]))
  cells = [f"{ops.get(x['op'], x['op'])} {'x'.join(map(str, x['shape']))} {x['fwd_bwd_ms']:.2f} ms (run {x['run']})"
           for x in at_defaults if int(x["run"]) == latest[x["op"]]]
  if cells:
    lines += ["", "The fused kernels, fwd+bwd only, each op in the last run that timed it (sweeps at that "
              f"run's defaults, no fla in those runs): {', '.join(cells)}."]
  if no_peer_bwd:
    lines += ["", f"fla's backward refused to run for {', '.join(sorted(no_peer_bwd))} (its guard against a "
              "Triton < 3.7.1 miscompile on Hopper); only its forward is timed there."]
  for impl, label in (("fused", "Fused Triton kernels"), ("mosaic_gpu", "Mosaic GPU kernels")):
    rows = [a for a in res.get("agreement", []) if a.get("impl", "fused") == impl]
    for dtype in ("float32", "bfloat16"):
      worst = max((a["max"] for a in rows if a.get("dtype") == dtype), default=None)
      if worst is not None:
        lines += ["", f"{label} vs the float32 scan on this GPU ({dtype}, 1x1024x4x128, outputs and every "
                  f"gradient): <= {worst:.1e} relative error."]
  if res.get("stages"):
    stages = ", ".join(f"{n} {ms:.2f} ms" for n, ms in res["stages"].items() if isinstance(ms, (int, float)))
    lines += ["", f"Fused delta rule, each stage alone (8x2048x16x128): {stages}."]
  gla_stages = [x for x in res.get("stage_sets", []) if x.get("op") == "gla" and x.get("params") == {}]
  if gla_stages:
    last = max(gla_stages, key=lambda x: int(x["run"]))
    stages = ", ".join(f"{n} {ms:.2f} ms" for n, ms in last["ms"].items() if isinstance(ms, (int, float)))
    lines += ["", f"Fused per-dimension GLA, each stage alone (8x2048x16x128, run {last['run']}): {stages}."]
  return "\n".join(lines)
