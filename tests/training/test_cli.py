"""The `elm` CLI: a short run writes metrics.jsonl / TensorBoard / config and lowers the loss;
eval and generate read its checkpoint; bad --set keys are rejected; a run killed with SIGKILL
and restarted reproduces the uninterrupted losses; SIGTERM saves a final checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from efficient_lm import cli
from efficient_lm.training.loop import train
from efficient_lm.training.metrics import read_jsonl, read_tensorboard_scalars
from tests.training.helpers import small_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _play_text(path):
  """A few hundred lines of verse-like text, so the run needs no data files."""
  rng = np.random.default_rng(0)
  words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
  lines = ["ROMEO: " + " ".join(rng.choice(words, 8)) + "." for _ in range(600)]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_cli_train_eval_generate(tmp_path, capsys):
  wd = str(tmp_path / "run")
  text = _play_text(tmp_path / "play.txt")
  rc = cli.main(["train", "--config", "shakespeare-char", "--workdir", wd, "--set", f"data.path={text}",
                 "--set", "train.steps=40", "--set", "train.eval_every=20",
                 "train.batch_size=8", "train.log_every=5", "data.seq_len=64",
                 "model.d_model=32", "model.n_heads=2", "optim.lr=1e-2", "optim.warmup_steps=5",
                 "train.eval_batches=2", "train.checkpoint_every=20"])
  assert rc == 0
  out = capsys.readouterr().out
  assert "step 40/40" in out and "eval_bits_per_char" in out
  recs = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30, 35, 40]
  for r in recs:
    for k in ("step", "loss", "lr", "grad_norm", "tokens_per_sec"):
      assert k in r and np.isfinite(r[k]), k
  assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
  assert "eval_loss" in recs[3] and "eval_bits_per_char" in recs[-1]
  assert recs[-1]["eval_loss"] < recs[3]["eval_loss"] + 0.2
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["train"]["steps"] == 40 and cfg["model_overrides"]["d_model"] == 32
  tb_dir = os.path.join(wd, "tb")
  (event_file,) = os.listdir(tb_dir)
  scalars = read_tensorboard_scalars(os.path.join(tb_dir, event_file))
  assert (40, "loss", pytest.approx(recs[-1]["loss"], rel=1e-6)) in scalars

  assert cli.main(["eval", "--workdir", wd, "--batches", "2"]) == 0
  ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert ev["step"] == 40 and ev["eval_loss"] == pytest.approx(recs[-1]["eval_loss"], rel=1e-5)

  assert cli.main(["generate", "--workdir", wd, "--prompt", "ROMEO:", "--max-new-tokens",
                   "12"]) == 0
  text = capsys.readouterr().out
  assert text.startswith("ROMEO:") and len(text.rstrip("\n")) >= len("ROMEO:") + 1


def test_bad_overrides_are_rejected(tmp_path, capsys):
  assert cli.main(["train", "--workdir", str(tmp_path), "--set", "train.stepz=3"]) == 2
  err = capsys.readouterr().err
  assert "unknown config key 'train.stepz'" in err
  assert "train.steps" in err and "model.d_model" in err and "data.seq_len" in err
  assert cli.main(["train", "--workdir", str(tmp_path), "train.steps=many"]) == 2
  assert "expected a value of type int" in capsys.readouterr().err
  assert cli.main(["train", "--workdir", str(tmp_path), "model.n_heads=3"]) == 2
  assert "n_heads" in capsys.readouterr().err
  assert cli.main(["train", "--config", "no-such-thing"]) == 2


def _launch(cfg_file, wd):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, "-m", "efficient_lm", "train", "--config", cfg_file,
                           "--workdir", wd], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc, timeout=240):
  t0 = time.time()
  while not cond():
    if proc.poll() is not None:
      raise AssertionError(f"run ended before the signal:\n{proc.stdout.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the run")
    time.sleep(0.02)


def _steps(wd):
  p = os.path.join(wd, "metrics.jsonl")
  if not os.path.exists(p):
    return []
  with open(p) as f:
    return [json.loads(l)["step"] for l in f if l.endswith("\n")]


def test_sigkill_and_restart_reproduces_losses(tmp_path):
  """Issue 5: 40 steps checkpointing every 10, SIGKILL after step 20, restart: steps 21-40 equal
  an uninterrupted run; SIGTERM makes a final checkpoint."""
  cfg = small_run(steps=40, checkpoint_every=10, async_checkpoint=True)
  ref = {r["step"]: r["loss"] for r in read_jsonl(os.path.join(
      train(cfg, str(tmp_path / "ref"))["workdir"], "metrics.jsonl"))}
  cfg_file = str(tmp_path / "cfg.json")
  json.dump(cfg.to_dict(), open(cfg_file, "w"))
  wd = str(tmp_path / "killed")
  p = _launch(cfg_file, wd)
  _wait_for(lambda: os.path.isdir(os.path.join(wd, "checkpoints", "20")) and
            max(_steps(wd) or [0]) >= 20, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert max(_steps(wd)) < 40, "the run should have been killed mid-way"
  p = _launch(cfg_file, wd)  # restart: resumes from the newest complete checkpoint
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-3000:]
  assert "resumed from checkpoint at step" in out
  got = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in got] == list(range(1, 41))
  for r in got:
    assert r["loss"] == ref[r["step"]], r["step"]

  wd2 = str(tmp_path / "terminated")
  p = _launch(cfg_file, wd2)
  _wait_for(lambda: max(_steps(wd2) or [0]) >= 3, p)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
  last = max(_steps(wd2))
  assert last < 40 and os.path.isdir(os.path.join(wd2, "checkpoints", str(last)))
