"""Weak scaling of the training step over GPUs and mesh layouts (issue 10).

    python experiments/scaling.py                       # every GPU count the machine has (1, 2, 4, 8)
    python experiments/scaling.py --quick               # CPU smoke test on fake host devices
    python experiments/scaling.py --plot-only

For each model, each device count n and each mesh (`data`: n x 1 x 1, `fsdp`: 1 x n x 1,
`fsdp_tensor`: 1 x n/2 x 2), one `elm bench` subprocess sees only n devices
(CUDA_VISIBLE_DEVICES) and runs the optimizer step with a fixed per-device batch. Weak-scaling
efficiency = tokens/s per device at n / tokens/s at 1 device (same model, same per-device batch).
Results: experiments/results/scaling/scaling.json and scaling.png (efficiency vs devices, one line
per model and mesh).

Models: `deltanet-340m` and a `rodimus_plus-1.6b`-shaped model, both at shortened depth (the
`--layers` flag) so that a full sweep of one machine kind fits one device call.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.common import pyplot, read_json, results_dir, run_meta, write_json  # noqa: E402

MESHES = {"data": lambda n: (n, 1, 1), "fsdp": lambda n: (1, n, 1), "fsdp_tensor": lambda n: (1, n // 2, 2)}
MODELS = {"deltanet-340m": "deltanet-340m", "rodimus_plus": "rodimus_plus-1.6b"}


def bench(preset, n, mesh, a):
  data, fsdp, tensor = MESHES[mesh](n)
  sets = [f"model={preset}", f"model.n_layers={a.layers}", f"train.batch_size={a.batch_per_device * n}",
          f"data.seq_len={a.seq_len}", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
          "model.dtype=bfloat16"] + a.set
  cmd = [sys.executable, "-m", "efficient_lm", "bench", "--steps", str(a.steps), "--warmup", "2"]
  for s in sets:
    cmd += ["--set", s]
  env = dict(os.environ)
  env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
  if a.quick:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
  else:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
  t0 = time.time()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
  row = {"model": preset, "devices": n, "mesh": mesh, "mesh_shape": [data, fsdp, tensor],
         "batch_per_device": a.batch_per_device, "seq_len": a.seq_len, "layers": a.layers,
         "wall_s": round(time.time() - t0, 1)}
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode == 0 and lines:
    out = json.loads(lines[-1])
    row.update({k: out.get(k) for k in ("step_ms", "tokens_per_sec", "mfu", "peak_bytes_per_device", "params")})
    row["tokens_per_sec_per_device"] = out["tokens_per_sec"] / n
  else:
    row["error"] = (proc.stderr or proc.stdout)[-1500:]
  return row


def efficiencies(rows):
  """Adds weak-scaling efficiency: per-device tokens/s relative to the same model on 1 device."""
  base = {r["model"]: r["tokens_per_sec_per_device"] for r in rows
          if r["devices"] == 1 and "tokens_per_sec_per_device" in r}
  for r in rows:
    if "tokens_per_sec_per_device" in r and r["model"] in base:
      r["efficiency"] = r["tokens_per_sec_per_device"] / base[r["model"]]
  return rows


def device_count(quick):
  if quick:
    return 2
  out = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices()))"],
                       capture_output=True, text=True)
  return int(out.stdout.strip().splitlines()[-1])


def plot(out_dir):
  plt = pyplot()
  res = read_json(os.path.join(out_dir, "scaling.json"))
  if plt is None:
    print("matplotlib is not installed: no plot")
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for model in sorted({r["model"] for r in res["rows"]}):
    for mesh in MESHES:
      pts = sorted((r["devices"], r["efficiency"]) for r in res["rows"]
                   if r["model"] == model and "efficiency" in r and (r["mesh"] == mesh or r["devices"] == 1))
      if len(pts) > 1:
        ax.plot(*zip(*pts), marker="o", label=f"{model} {mesh}")
  ax.axhline(0.9, color="grey", ls="--", lw=0.8)
  ax.set_xlabel("devices")
  ax.set_ylabel("weak-scaling efficiency")
  ax.set_title(f"{res['meta'].get('hardware', '')}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "scaling.png"), dpi=120)


def markdown(out_dir):
  res = read_json(os.path.join(out_dir, "scaling.json"))
  lines = [f"Weak scaling ({res['meta'].get('hardware')}, {res['meta'].get('date')}; per-device batch "
           f"{res['rows'][0]['batch_per_device']} x {res['rows'][0]['seq_len']}, {res['rows'][0]['layers']} layers):",
           "", "| model | devices | mesh | step ms | tokens/s per device | efficiency | MFU | peak GiB/device |",
           "|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['devices']} | {r['mesh']} | error | | | | |")
      continue
    peak = r.get("peak_bytes_per_device")
    lines.append(f"| {r['model']} | {r['devices']} | {r['mesh']} | {r['step_ms']:.1f} | "
                 f"{r['tokens_per_sec_per_device']:,.0f} | {r.get('efficiency', float('nan')):.2f} | "
                 f"{(r.get('mfu') or 0) * 100:.1f}% | {'' if peak is None else f'{peak / 2**30:.1f}'} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=None)
  p.add_argument("--quick", action="store_true", help="tiny models on 1 and 2 fake CPU devices")
  p.add_argument("--plot-only", action="store_true")
  p.add_argument("--models", default="deltanet-340m,rodimus_plus")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--batch-per-device", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--timeout", type=int, default=600)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides")
  a = p.parse_args()
  out_dir = a.out or results_dir("scaling")
  os.makedirs(out_dir, exist_ok=True)
  if a.plot_only:
    plot(out_dir)
    return
  if a.quick:
    a.layers, a.batch_per_device, a.seq_len, a.steps = 1, 2, 32, 2
    a.set = a.set + ["model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.vocab_size=64",
                     "model.mlp_hidden=64", "model.impl=scan", "model.dtype=float32"]
  started = time.time()
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"   # this parent only reads device facts
  counts = [n for n in (1, 2, 4, 8) if n <= device_count(a.quick)]
  res = {"meta": run_meta(started=started, device_counts=counts), "rows": []}
  for name in a.models.split(","):
    for n in counts:
      for mesh in (["fsdp"] if n == 1 else list(MESHES)):
        row = bench(MODELS[name], n, mesh, a)
        row["model"] = name
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        res["rows"] = efficiencies(res["rows"])
        res["meta"]["wall_s"] = round(time.time() - started, 1)
        write_json(os.path.join(out_dir, "scaling.json"), res)
  plot(out_dir)


if __name__ == "__main__":
  main()
