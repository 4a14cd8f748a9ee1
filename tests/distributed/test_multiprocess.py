"""Multi-process training on jax.distributed (CPU, localhost, gloo collectives).

2 processes x 4 devices must train the default run exactly like 1 process x 8 devices (same
global batches, same mesh shape, same per-step losses up to float32 reduction order); their
checkpoint must restore in 1 process and continue with the same losses; a process killed
mid-run must leave the last complete checkpoint loadable. Every launch has a timeout, so a hang
fails the test instead of CI.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.distributed import launch

pytestmark = pytest.mark.slow

RTOL = 2e-5  # float32; only the order of cross-device reductions differs


def _train_args(workdir, *extra):
  return ["train", "--workdir", str(workdir)] + launch.DEFAULT_SHORT + list(extra)


def _finalized_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_two_processes_match_one_and_checkpoint_restores_in_one(tmp_path):
  ref, mp, moved = tmp_path / "ref", tmp_path / "mp", tmp_path / "moved"
  launch.run(_train_args(ref), procs=1, devices=8, log_dir=str(tmp_path / "log_ref"), timeout=120)
  launch.run(_train_args(mp), procs=2, devices=4, log_dir=str(tmp_path / "log_mp"), timeout=150)

  want, got = launch.losses(ref), launch.losses(mp)
  assert sorted(want) == sorted(got) == list(range(1, launch.STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=RTOL)

  # only process 0 writes metrics, TensorBoard, the summary line and INFO logs
  assert len(open(mp / "metrics.jsonl").readlines()) == launch.STEPS
  assert len(os.listdir(mp / "tb")) == 1
  log0 = open(tmp_path / "log_mp" / "proc0.log").read()
  log1 = open(tmp_path / "log_mp" / "proc1.log").read()
  assert "2 process(es)" in log0 and "final MQAR accuracy" in log0
  assert "final MQAR accuracy" not in log1 and " INFO " not in log1
  # every process's data shard is in the checkpoint
  assert sorted(f for f in os.listdir(mp / "checkpoints" / "3" / "data")
                if f.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]

  # the 2-process checkpoint at step 3 restores in 1 process (8 devices) and continues
  shutil.copytree(mp, moved)
  shutil.rmtree(moved / "checkpoints" / str(launch.STEPS))
  launch.run(_train_args(moved), procs=1, devices=8, log_dir=str(tmp_path / "log_moved"),
             timeout=120)
  assert "resumed from checkpoint at step 3" in open(tmp_path / "log_moved" / "proc0.log").read()
  cont = launch.losses(moved)
  assert sorted(cont) == list(range(1, launch.STEPS + 1))
  np.testing.assert_allclose([cont[s] for s in range(4, launch.STEPS + 1)],
                             [want[s] for s in range(4, launch.STEPS + 1)], rtol=RTOL)


def test_killed_process_leaves_last_complete_checkpoint_loadable(tmp_path):
  wd, log_dir = tmp_path / "run", str(tmp_path / "log")
  args = ["train", "--workdir", str(wd)] + launch.DEFAULT_SHORT + [
      "train.steps=500", "train.checkpoint_every=2", "train.async_checkpoint=true"]
  ps = launch.start(args, procs=2, devices=4, log_dir=log_dir)
  try:
    deadline = time.time() + 150
    while not any(s >= 4 for s in _finalized_steps(wd)):
      assert all(p.poll() is None for p in ps), launch.logs(log_dir)
      assert time.time() < deadline, "no checkpoint >= 4 in time\n" + launch.logs(log_dir)
      time.sleep(0.1)
    ps[1].send_signal(signal.SIGKILL)  # a worker dies mid-run (no chance to save)
    time.sleep(3)  # process 0 keeps going or blocks in a collective; then the job is torn down
  finally:
    launch.kill_all(ps)
  steps = _finalized_steps(wd)
  assert steps and steps[-1] < 500
  # the newest complete checkpoint loads in a fresh single process
  out = subprocess.run(
      [sys.executable, "-m", "efficient_lm", "eval", "--workdir", str(wd), "--batches", "1"],
      env=launch._env(8), cwd=launch.ROOT, capture_output=True, text=True, timeout=90)
  assert out.returncode == 0, out.stdout + out.stderr
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["step"] == steps[-1], (res, steps, out.stderr[-3000:])
  assert np.isfinite(res["eval_loss"])
