"""Run `elm train` / `elm eval` as N local processes on CPU (jax.distributed over localhost,
gloo collectives), each with its own fake CPU devices; every call has a hard timeout."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The default run (MQAR, deltanet-tiny, global batch 64), shortened to a few steps. (With the
# chunked form instead of the default run's scan, jax 0.10.2's XLA CPU runtime deadlocked in a
# 1-process x 8-device step at batch 64 on a 2-core machine; jax 0.12 did not.)
STEPS = 6
DEFAULT_SHORT = [f"train.steps={STEPS}", "train.log_every=1",
                 "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=3",
                 "train.progress=off", "train.tensorboard=true"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "ELM_DISTRIBUTED"):
    env.pop(k, None)
  return env


def start(args: list[str], procs: int, devices: int, log_dir: str) -> list[subprocess.Popen]:
  """Start `python -m efficient_lm <args>` as `procs` processes of `devices` devices each."""
  os.makedirs(log_dir, exist_ok=True)
  port = free_port()
  out = []
  for i in range(procs):
    cmd = [sys.executable, "-m", "efficient_lm"] + list(args)
    if procs > 1:
      cmd += ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(procs),
              "--process-id", str(i)]
    log = open(os.path.join(log_dir, f"proc{i}.log"), "w")
    out.append(subprocess.Popen(cmd, env=_env(devices), stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True))
  return out


def kill_all(ps: list[subprocess.Popen]) -> None:
  for p in ps:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  for p in ps:
    p.wait()


def logs(log_dir: str) -> str:
  text = []
  for f in sorted(os.listdir(log_dir)):
    if f.endswith(".log"):
      with open(os.path.join(log_dir, f), errors="replace") as fh:
        text.append(f"--- {f}\n" + fh.read()[-4000:])
  return "\n".join(text)


def run(args: list[str], procs: int, devices: int, log_dir: str, timeout: float) -> None:
  """Run to completion; a hang or a non-zero exit fails with every process's log."""
  ps = start(args, procs, devices, log_dir)
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in ps):
      if time.time() > deadline:
        raise AssertionError(f"timed out after {timeout}s: {args}\n{logs(log_dir)}")
      if any(p.poll() not in (None, 0) for p in ps):
        time.sleep(2)  # let the others report, then fail
        raise AssertionError(f"a process failed: {[p.poll() for p in ps]}\n{logs(log_dir)}")
      time.sleep(0.2)
  finally:
    kill_all(ps)
  codes = [p.returncode for p in ps]
  assert codes == [0] * procs, f"exit codes {codes}\n{logs(log_dir)}"


def losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
