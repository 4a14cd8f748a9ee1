"""What every experiment script shares: where results go and the run facts stored beside them.

Results are JSON under `experiments/results/<name>/`; each file carries `meta` (hardware,
software versions, seed, wall time, the command) so a table in the README can say what it is.
Plots are drawn from the JSON by the script's `plot` step, which may run on another machine
(matplotlib is the `experiments` extra; the GPU machine need not have it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def results_dir(name: str) -> str:
  path = os.path.join(RESULTS_ROOT, name)
  os.makedirs(path, exist_ok=True)
  return path


def run_meta(*, seed=None, started: float | None = None, **extra) -> dict:
  """Hardware, versions, command and wall time of this process's run."""
  import jax  # noqa: PLC0415  (imported late so the plot step works without jax)
  dev = jax.devices()[0]
  meta = {
      "hardware": f"{len(jax.devices())} x {getattr(dev, 'device_kind', dev.platform)}",
      "platform": dev.platform,
      "jax": jax.__version__,
      "python": platform.python_version(),
      "host": platform.node(),
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }
  try:
    import flax  # noqa: PLC0415
    meta["flax"] = flax.__version__
  except ImportError:
    pass
  if seed is not None:
    meta["seed"] = seed
  if started is not None:
    meta["wall_s"] = round(time.time() - started, 1)
  meta.update(extra)
  return meta


def write_json(path: str, obj) -> None:
  """Atomic write: a run cut off mid-write never leaves a truncated results file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def experiment_parser(doc: str, *, quick_help: str, full_help: str) -> argparse.ArgumentParser:
  """The flags every experiment script takes: --quick | --full (else the minimum credible
  version), --out, --plot-only."""
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true", help=quick_help)
  g.add_argument("--full", action="store_true", help=full_help)
  p.add_argument("--out", default=None, help="results folder (default experiments/results/<name>)")
  p.add_argument("--plot-only", action="store_true", help="draw the PNG from the JSON in --out")
  return p


def version_of(args) -> str:
  """"quick", "full" or "min" (the minimum credible version) from experiment_parser's flags."""
  return "quick" if args.quick else "full" if args.full else "min"


def pyplot():
  """matplotlib.pyplot with a file backend, or None when matplotlib is not installed."""
  try:
    import matplotlib  # noqa: PLC0415
  except ImportError:
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def results_and_pyplot(out: str, file: str):
  """(the results JSON `out/file`, pyplot) for drawing a plot, or None after saying which is missing."""
  path = os.path.join(out, file)
  if not os.path.exists(path):
    print(f"no results at {path}: nothing to plot")
    return None
  plt = pyplot()
  if plt is None:
    print("matplotlib is not installed: no plot (run --plot-only where it is)")
    return None
  return read_json(path), plt
