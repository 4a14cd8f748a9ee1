"""Where one jitted fwd+bwd spends its device time: per-kernel totals from a jax.profiler trace.

    python experiments/profile_ops.py [--targets gla,delta,moe_tokamax,moe_xla] [--out DIR] [--iters 10]
    python experiments/profile_ops.py --smoke      # CPU: tiny shapes, interpret-mode kernels

Per target: compile, warm up, trace --iters calls (`jax.profiler.trace(create_perfetto_trace=True)`),
then sum the duration of every complete event by (track, name) and divide by --iters. A track is
one thread of a device process ("/device:GPU:0": its streams and XLA's derived op lines, each a
table of its own, so nothing is counted twice); without a device process (a CPU run) the XLA
threads of the host. Writes profile_ops.json into --out ({"meta", "rows"}: target, track, kernel,
ms per call, calls per call, share of the track, source: the op_name in the optimised HLO's
metadata, which names the jax operation a fusion came from) and hlo_<target>.txt, and prints each
track's top kernels. The output is kept live beside the gradients, as in training.
Targets, bf16 (gpu_check_fused's and bench_fastpaths' inputs):
- gla, delta: per-dim GLA / the delta rule through the fused Triton-backend kernels, 8x2048x16x128;
- gla_default, delta_default: the same through `impl="pallas"`, the kernels the dispatch picks for
  this device (on an H100 the delta rule's are Mosaic GPU's);
- moe_tokamax, moe_xla: the MoE layer of rmoe-paper shape (8x2048 tokens, top-4 of 16, d 1280,
  expert hidden 448) with tokamax's ragged_dot / jax.lax.ragged_dot.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

TARGETS = ("gla", "delta", "gla_default", "delta_default", "moe_tokamax", "moe_xla")


def _with_output(f, cotangent, *args):
  """(f's output, its VJP): the output kept live, else XLA drops whatever only the output needs
  (the GLA output kernel, the MoE combine) and the profile misses it."""
  out, vjp = jax.vjp(f, *args)
  return out, vjp(cotangent)


def recurrence_target(op, path, smoke):
  """op: "gla" or "delta"; path: "fused" (the Triton-backend fused kernels) or "pallas" (the dispatch)."""
  from experiments import gpu_check_fused as g  # noqa: PLC0415
  g.SMOKE = smoke
  b, t, h, d = (1, 128, 2, 32) if smoke else (8, 2048, 16, 128)
  x = g.inputs(op, b, t, h, d, d, jnp.bfloat16, gated=False if op == "delta" else None)
  f = (g.delta_fn if op == "delta" else g.gla_fn)(path)
  do = jnp.asarray(np.random.default_rng(3).standard_normal((b, t, h, d)), jnp.bfloat16)
  ds = jnp.zeros((b, h, d, d), jnp.float32)
  fn = jax.jit(lambda x: _with_output(f, (do, ds), x))
  return fn, (x,), f"{op} {path} fwd+bwd {b}x{t}x{h}x{d}"


def moe_target(impl, smoke):
  from experiments.bench_fastpaths import moe_layer, moe_problem  # noqa: PLC0415
  x, w_router, ws, cot, k = moe_problem(smoke, np.random.default_rng(0))
  (n, d), (e, _, hid) = x.shape, ws[0].shape
  layer = moe_layer(w_router, k, impl)
  fn = jax.jit(lambda x, *w: _with_output(layer, cot, x, *w))
  return fn, (x, *ws), f"MoE layer fwd+bwd, {impl}, {n} tokens top-{k} of {e}, d {d}, hidden {hid}"


def make_target(name, smoke):
  if name in ("gla", "delta"):
    return recurrence_target(name, "fused", smoke)
  if name in ("gla_default", "delta_default"):
    return recurrence_target(name[:-len("_default")], "pallas", smoke)
  return moe_target(name[len("moe_"):], smoke)


def read_trace(log_dir):
  paths = glob.glob(os.path.join(log_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise RuntimeError(f"no perfetto trace under {log_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def kernel_totals(events):
  """{track: {name: (total microseconds, count)}} over the device tracks (else the host's XLA threads)."""
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {pid for pid, name in procs.items() if "/device:" in name}
  totals = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
  for e in events:
    if e.get("ph") != "X":
      continue
    pid, tid = e.get("pid"), e.get("tid")
    thread = threads.get((pid, tid), str(tid))
    if device:
      if pid not in device:
        continue
    elif thread == "python" or not thread.startswith("tf_XLA"):
      continue
    cell = totals[f"{procs.get(pid, pid)} / {thread}"][e["name"]]
    cell[0] += float(e.get("dur", 0.0))
    cell[1] += 1
  return totals


def hlo_sources(hlo_text):
  """{instruction name: its jax op_names} from an optimised HLO module's text, which tells a fusion
  in the trace from the program line it came from. A fusion without metadata of its own gets
  the distinct op_names inside the computation it calls (the last two path parts of each)."""
  own, calls, inside, computation = {}, {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    head = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+) \(.*\{\s*$", line)
    if head:
      computation = head.group(1)
      continue
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = ", line)
    if not m:
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    if op_name:
      own.setdefault(m.group(1), op_name.group(1))
      short = "/".join(op_name.group(1).split("/")[-2:])
      if computation and short not in inside[computation]:
        inside[computation].append(short)
    callee = re.search(r"calls=%?([\w.\-]+)", line)
    if callee:
      calls[m.group(1)] = callee.group(1)
  sources = dict(own)
  for name, callee in calls.items():
    if name not in own and inside.get(callee):
      sources[name] = " | ".join(inside[callee][:4])
  return sources


def profile(name, smoke, iters, top, out_dir=None):
  fn, args, label = make_target(name, smoke)
  compiled = fn.lower(*args).compile()
  hlo = compiled.as_text()
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"hlo_{name}.txt"), "w") as f:
      f.write(hlo)
  sources = hlo_sources(hlo)
  call = lambda: compiled(*args)
  for _ in range(3):
    jax.block_until_ready(call())
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(iters):
        jax.block_until_ready(call())
    totals = kernel_totals(read_trace(log_dir))
  rows = []
  for track, names in totals.items():
    track_us = sum(us for us, _ in names.values())
    ranked = sorted(names.items(), key=lambda kv: -kv[1][0])
    print(f"\n== {label} | {track}: {track_us / iters / 1e3:.3f} ms per call in {len(names)} kernels")
    for kernel, (us, count) in ranked[:top]:
      row = {"target": name, "label": label, "track": track, "kernel": kernel, "ms": us / iters / 1e3,
             "calls": count / iters, "share": us / track_us if track_us else 0.0,
             "source": sources.get(kernel, "")}
      rows.append(row)
      print(f"  {row['ms']:8.3f} ms {100 * row['share']:5.1f}% x{row['calls']:g}  {kernel[:60]}  {row['source'][-90:]}")
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from " + ", ".join(TARGETS))
  p.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernels"))
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--top", type=int, default=25, help="kernels kept per track")
  p.add_argument("--smoke", action="store_true", help="tiny shapes and interpret-mode kernels (a CPU)")
  a = p.parse_args(argv)
  if a.iters < 1:
    p.error(f"--iters: expected 1 or more, got {a.iters}")
  names = a.targets.split(",")
  unknown = [n for n in names if n not in TARGETS]
  if unknown:   # before any target runs, not after the ones ahead of it have been profiled
    p.error(f"--targets: expected names from {TARGETS}, got {unknown}")
  rows, failed = [], {}
  for name in names:
    try:
      rows += profile(name, a.smoke, a.iters, a.top, a.out)
    except Exception as e:  # one target's failure (tokamax absent, a kernel that will not lower) keeps the rest
      failed[name] = f"{type(e).__name__}: {e}"[:2000]
      print(f"{name}: failed: {failed[name]}", flush=True)
  os.makedirs(a.out, exist_ok=True)
  meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "iters": a.iters, "smoke": a.smoke,
          "failed": failed}
  with open(os.path.join(a.out, "profile_ops.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  return rows, failed


if __name__ == "__main__":
  main()
