"""Times the recurrence forms side by side with flash-linear-attention in one process.

    python experiments/bench_kernels.py --out experiments/results/kernels   [--check] [--anchors 0,3]

For each anchor shape of recurrences.md section 5: scan (forward), chunk and pallas
(forward and forward+backward) and, when torch + fla import, fla's chunk_delta_rule /
chunk_gla. Median wall time of `--iters` runs after warm-up, each synchronised; ratio to
fla; achieved TFLOP/s (chunked-algorithm flop count) and GB/s (inputs + outputs once);
compiled temp memory of the JAX forms. `--check` first runs the agreement checks on this
device (pallas vs the float32 scan, forward and every gradient). Writes JSON (+ PNG).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

ANCHORS = [  # (op, B, T, H, K, V)
    ("delta_rule", 8, 2048, 16, 128, 128),
    ("delta_rule", 2, 8192, 16, 128, 128),
    ("delta_rule", 1, 32768, 16, 128, 128),
    ("gla", 8, 2048, 16, 128, 128),
    ("gla", 2, 8192, 16, 128, 128),
    ("gla", 1, 32768, 16, 128, 128),
    ("gla", 8, 2048, 1, 64, 2048),  # Rodimus: one head, K = mem 64, V = d_inner
]
CHUNK = 64


def flops(op, b, t, h, kd, vd, backward):
  """Chunked-algorithm flops (recurrences.md section 2); backward counted as 2x forward."""
  c = CHUNK
  per_chunk = 2 * c * c * kd + 2 * c * c * vd + 2 * c * kd * vd * 2
  if op == "delta_rule":
    per_chunk += 2 * c * c * kd + c ** 3 / 3 + 2 * c * c * (kd + vd) + 2 * c * kd * vd
  total = per_chunk * b * h * (t // c)
  return total * (3 if backward else 1)


def io_bytes(b, t, h, kd, vd, itemsize, backward):
  fwd = b * t * h * (2 * kd + vd + vd + kd) * itemsize  # q, k, v, o, gate
  return fwd * (3 if backward else 1)


def median_ms(fn, sync, iters, warmup=3):
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def make_inputs(op, b, t, h, kd, vd, dtype, seed=0):
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((b, t, h, kd), np.float32)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  x = {"q": rng.standard_normal((b, t, h, kd), np.float32), "k": k,
       "v": rng.standard_normal((b, t, h, vd), np.float32)}
  if op == "delta_rule":
    x["beta"] = 1 / (1 + np.exp(-rng.standard_normal((b, t, h)).astype(np.float32)))
  else:
    x["g"] = -np.log1p(np.exp(-rng.standard_normal((b, t, h, kd)).astype(np.float32)))  # logsigmoid
  return {n: jnp.asarray(a, dtype) for n, a in x.items()}


def jax_op(op, impl):
  if op == "delta_rule":
    return lambda x: pk.delta_rule(x["q"], x["k"], x["v"], x["beta"], impl=impl, chunk_size=CHUNK)[0]
  return lambda x: pk.gla(x["q"], x["k"], x["v"], x["g"], impl=impl, chunk_size=CHUNK)[0]


def jax_fns(op, impl):
  f = jax_op(op, impl)
  fwd = jax.jit(f)
  fwd_bwd = jax.jit(lambda x, do: jax.vjp(f, x)[1](do))
  return fwd, fwd_bwd


def temp_mb(fn, *args):
  try:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2 ** 20
  except Exception:  # memory analysis is best effort on some backends
    return None


def fla_fns(op, x):
  import torch
  from fla.ops.delta_rule import chunk_delta_rule
  from fla.ops.gla import chunk_gla

  to_t = lambda a: torch.from_dlpack(np.asarray(a.astype(jnp.float32))).cuda().to(torch.bfloat16).requires_grad_()
  tx = {n: to_t(a) for n, a in x.items()}
  do = torch.randn_like(tx["v"])

  if op == "delta_rule":
    call = lambda: chunk_delta_rule(tx["q"], tx["k"], tx["v"], tx["beta"])[0]
    params = [tx["q"], tx["k"], tx["v"], tx["beta"]]
  else:
    call = lambda: chunk_gla(tx["q"], tx["k"], tx["v"], tx["g"])[0]
    params = [tx["q"], tx["k"], tx["v"], tx["g"]]

  def fwd():
    with torch.no_grad():
      return call()

  def fwd_bwd():
    return torch.autograd.grad(call(), params, do)

  def peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

  return fwd, fwd_bwd, lambda _: torch.cuda.synchronize(), peak_mb


# The agreement checks run at the anchors' T, K and V with one sequence and fewer heads where the
# scan's gradient (every state stored, float32) would not fit: B*T*H*K*V*4 bytes, 2 GiB here.
CHECK_SHAPES = [  # (op, B, T, H, K, V)
    ("delta_rule", 1, 2048, 16, 128, 128),
    ("delta_rule", 1, 8192, 4, 128, 128),
    ("gla", 1, 2048, 16, 128, 128),
    ("gla", 1, 8192, 4, 128, 128),
    ("gla", 1, 2048, 1, 64, 2048),
]


def check_agreement(report, shapes):
  """pallas vs the float32 scan on this device: forward and every gradient, rel. error."""
  rows = []
  for op, b, t, h, kd, vd in shapes:
    for dtype in (jnp.float32, jnp.bfloat16):
      x = make_inputs(op, b, t, h, kd, vd, dtype, seed=1)
      do = jnp.asarray(np.random.default_rng(2).standard_normal((b, t, h, vd)), jnp.float32)
      ref_x = {n: a.astype(jnp.float32) for n, a in x.items()}
      f_ref = jax_op(op, "scan")
      o_ref, vjp_ref = jax.vjp(f_ref, ref_x)
      (g_ref,) = vjp_ref(do)
      row = {"op": op, "dtype": jnp.dtype(dtype).name, "shape": [b, t, h, kd, vd]}
      try:
        f = jax_op(op, "pallas")
        o, vjp = jax.vjp(f, x)
        (g,) = vjp(do.astype(o.dtype))
        rel = lambda a, r: float(jnp.linalg.norm(a.astype(jnp.float32) - r) / jnp.linalg.norm(r))
        row["o"] = rel(o, o_ref)
        row.update({f"d{n}": rel(g[n], g_ref[n]) for n in g})
        tol = 1e-4 if dtype == jnp.float32 else 1e-2
        row["pass"] = all(row[name] < tol for name in ["o"] + [f"d{n}" for n in g])
      except Exception as e:  # report, keep going
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        row["pass"] = False
      print("check", row, flush=True)
      rows.append(row)
  report["agreement"] = rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="experiments/results/kernels")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--anchors", default=None, help="comma-separated indices into ANCHORS (default all)")
  ap.add_argument("--check-shapes", default=None, help="comma-separated indices into CHECK_SHAPES (default all)")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)

  report = {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
            "jax": jax.__version__, "chunk_size": CHUNK, "iters": args.iters, "results": []}
  try:
    import fla
    import torch
    report["torch"], report["fla"] = torch.__version__, getattr(fla, "__version__", "?")
    have_fla = torch.cuda.is_available()
  except ImportError as e:
    report["fla"] = f"unavailable: {e}"
    have_fla = False
  pick = lambda table, arg: table if arg is None else [table[int(i)] for i in arg.split(",")]
  if args.check:
    check_agreement(report, pick(CHECK_SHAPES, args.check_shapes))

  anchors = pick(ANCHORS, args.anchors)
  for op, b, t, h, kd, vd in anchors:
    x = make_inputs(op, b, t, h, kd, vd, jnp.bfloat16)
    do = jnp.asarray(np.random.default_rng(3).standard_normal((b, t, h, vd)), jnp.bfloat16)
    shape = {"op": op, "B": b, "T": t, "H": h, "K": kd, "V": vd}
    impls = ["chunk", "pallas"] + (["scan"] if t * b <= 16384 and h > 1 else [])
    for impl in impls:
      fwd, fwd_bwd = jax_fns(op, impl)
      modes = [("fwd", fwd, (x,))] + ([] if impl == "scan" else [("fwd_bwd", fwd_bwd, (x, do))])
      for mode, fn, a in modes:
        row = dict(shape, impl=impl, mode=mode)
        try:
          row["ms"] = median_ms(lambda: fn(*a), jax.block_until_ready, args.iters)
          row["temp_mb"] = temp_mb(fn, *a)
        except Exception as e:
          row["error"] = f"{type(e).__name__}: {e}"[:300]
        report["results"].append(row)
        print(row, flush=True)
    if have_fla:
      fwd, fwd_bwd, sync, peak = fla_fns(op, x)
      for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        row = dict(shape, impl="fla", mode=mode)
        try:
          row["ms"] = median_ms(fn, sync, args.iters)
          row["peak_mb"] = peak(fn)
        except Exception as e:
          row["error"] = f"{type(e).__name__}: {e}"[:300]
        report["results"].append(row)
        print(row, flush=True)

    write(report, args.out)
  print(summary(report), flush=True)


def write(report, out):
  """Derived columns, then JSON and PNG; called after every shape so a cut-off run keeps its rows."""
  for row in report["results"]:
    if "ms" not in row:
      continue
    backward = row["mode"] == "fwd_bwd"
    dims = (row["B"], row["T"], row["H"], row["K"], row["V"])
    row["tflops"] = flops(row["op"], *dims, backward) / (row["ms"] * 1e-3) / 1e12
    row["gbps"] = io_bytes(*dims, 2, backward) / (row["ms"] * 1e-3) / 1e9
    peer = _same_shape(report, row, "fla")
    if peer:
      row["ratio_to_fla"] = row["ms"] / peer["ms"]
    chunk = _same_shape(report, row, "chunk")
    if chunk and row["impl"] == "pallas":
      row["speedup_vs_chunk"] = chunk["ms"] / row["ms"]
  with open(os.path.join(out, "bench_kernels.json"), "w") as f:
    json.dump(report, f, indent=1)
  plot(report, os.path.join(out, "bench_kernels.png"))

def _same_shape(report, row, impl):
  """The timed row of `impl` at row's op, shape and mode, or None."""
  return next((r for r in report["results"] if r["impl"] == impl and r["mode"] == row["mode"] and "ms" in r
               and all(r[k] == row[k] for k in ("op", "B", "T", "H", "K", "V"))), None)


def summary(report):
  """fwd+bwd per anchor: chunk, pallas and fla ms, pallas / fla and chunk / pallas (the issue's targets)."""
  lines = ["| op | BxTxHxKxV | chunk ms | pallas ms | fla ms | pallas / fla | chunk / pallas |", "|---" * 7 + "|"]
  for row in report["results"]:
    if row["impl"] != "pallas" or row["mode"] != "fwd_bwd" or "ms" not in row:
      continue
    ms = lambda impl: (_same_shape(report, row, impl) or {}).get("ms")
    fmt = lambda x, spec=".2f", unit="": "-" if x is None else format(x, spec) + unit
    ratio = lambda a, b: None if a is None or b is None else a / b
    lines.append(f"| {row['op']} | {row['B']}x{row['T']}x{row['H']}x{row['K']}x{row['V']} | {fmt(ms('chunk'))} | "
                 f"{fmt(row['ms'])} | {fmt(ms('fla'))} | {fmt(ratio(row['ms'], ms('fla')), '.2f', 'x')} | "
                 f"{fmt(ratio(ms('chunk'), row['ms']), '.1f', 'x')} |")
  return "\n".join(lines)


NAME, FILE = "kernels", "bench_kernels.json"   # experiments/report.py: the README block


def markdown(results_dir: str) -> str:
  """The README block from `results_dir/bench_kernels.json`: the targets' table and the agreement."""
  with open(os.path.join(results_dir, FILE)) as f:
    report = json.load(f)
  lines = [f"`bench_kernels.py` ({report['device']}, jax {report['jax']}, fla {report.get('fla', '-')}; bf16, "
           f"chunk {report['chunk_size']}, median of {report['iters']}; every form in one process), fwd+bwd:", "",
           summary(report), ""]
  checks = report.get("agreement", [])
  for dtype in sorted({r["dtype"] for r in checks}):
    rows = [r for r in checks if r["dtype"] == dtype]
    worst = max((v for r in rows for k, v in r.items() if k == "o" or (k.startswith("d") and k != "dtype")),
                default=None)
    lines.append(f"Pallas vs the float32 scan on this GPU ({dtype}, {len(rows)} shapes, output and every gradient): "
                 f"{sum(r['pass'] for r in rows)}/{len(rows)} pass, worst relative error "
                 f"{'-' if worst is None else format(worst, '.1e')}.")
  if report.get("note"):
    lines += ["", report["note"]]
  return "\n".join(lines + [""])


def plot(report, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  rows = [r for r in report["results"] if r["mode"] == "fwd_bwd" and "ms" in r]
  labels = sorted({f"{r['op']} {r['B']}x{r['T']}x{r['H']}x{r['K']}x{r['V']}" for r in rows})
  impls = sorted({r["impl"] for r in rows})
  fig, ax = plt.subplots(figsize=(10, 4))
  width = 0.8 / max(len(impls), 1)
  for i, impl in enumerate(impls):
    ms = [next((r["ms"] for r in rows if r["impl"] == impl and
                f"{r['op']} {r['B']}x{r['T']}x{r['H']}x{r['K']}x{r['V']}" == lab), 0) for lab in labels]
    ax.bar(np.arange(len(labels)) + i * width, ms, width, label=impl)
  ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=20, ha="right", fontsize=7)
  ax.set_ylabel("fwd+bwd ms (median)")
  ax.set_yscale("log")
  ax.legend()
  ax.set_title(f"{report['device']}, bf16, chunk {report['chunk_size']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
