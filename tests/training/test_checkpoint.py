"""Orbax checkpoints: round trip with the data iterator, keep-last-N, a corrupt newest checkpoint
falls back to the previous one, a non-finite loss stops the run and keeps the last good one,
and a resumed run continues with the losses of an uninterrupted one."""
import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_lm.data.packing import PackedSource, concat_documents
from efficient_lm.data.pipeline import host_batches
from efficient_lm.training.checkpoint import Checkpointer, abstract_like
from efficient_lm.training.loop import NonFiniteLossError, train
from efficient_lm.training.metrics import read_jsonl
from tests.training.helpers import small_run, with_train


def _toy_state(seed):
  """A pure-pytree stand-in for {params, opt_state, step}: checkpoint mechanics only."""
  k = jax.random.key(seed)
  return {"params": {"w": jax.random.normal(k, (4, 8)), "b": jnp.arange(3.0)},
          "opt_state": (jnp.ones((4, 8)) * seed, {"count": jnp.asarray(seed, jnp.int32)}),
          "step": jnp.asarray(seed, jnp.int32)}


def _iter():
  tokens, starts = concat_documents([np.arange(1, 200, dtype=np.int32)])
  return iter(host_batches(PackedSource(tokens, starts, 8), 2, 0, 1, seed=0))


def test_round_trip_with_iterator(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=2, keep_best=0, async_save=True)
  it = _iter()
  for _ in range(5):
    next(it)
  state = _toy_state(7)
  ck.save(7, state, it, {"hello": 1})
  want = [next(it) for _ in range(4)]
  ck.close()
  ck2 = Checkpointer(str(tmp_path), keep=2, keep_best=0)
  it2 = _iter()
  step, restored = ck2.restore_latest(abstract_like(_toy_state(0)), it2)
  assert step == 7
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored["config"] == {"hello": 1}
  for w in want:
    np.testing.assert_array_equal(w["inputs"], next(it2)["inputs"])
  ck2.close()


def test_keeps_last_n_and_best(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=2, keep_best=1, async_save=False)
  it = _iter()
  for s, ev in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, None)]:
    ck.save(s, _toy_state(s), it, {}, metrics=None if ev is None else {"eval_loss": ev})
  ck.wait()
  assert ck.all_steps() == [2, 4, 5]  # the last two and the best (lowest eval loss)
  ck.close()


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
  ck = Checkpointer(str(tmp_path), keep=3, keep_best=0, async_save=False)
  it = _iter()
  ck.save(1, _toy_state(1), it, {})
  ck.save(2, _toy_state(2), it, {})
  ck.close()
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  for root, _, files in os.walk(state_dir):  # truncate every file of the newest checkpoint
    for f in files:
      open(os.path.join(root, f), "wb").close()
  ck2 = Checkpointer(str(tmp_path), keep=3, keep_best=0)
  with caplog.at_level(logging.WARNING, logger="efficient_lm"):
    step, restored = ck2.restore_latest(abstract_like(_toy_state(0)), _iter())
  assert step == 1
  np.testing.assert_array_equal(np.asarray(restored["state"]["step"]), 1)
  assert any("step 2" in r.getMessage() and "falling back" in r.getMessage()
             for r in caplog.records)
  ck2.close()


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def test_resume_continues_with_identical_losses(tmp_path):
  cfg = small_run(steps=12, checkpoint_every=4, eval_every=6)
  full = _losses(train(cfg, str(tmp_path / "full"))["workdir"])
  assert sorted(full) == list(range(1, 13))
  part = str(tmp_path / "part")
  s = train(cfg, part, stop_after=6)  # a run that "dies" after step 6 (checkpoint at 4)
  assert s["step"] == 6
  shutil.rmtree(os.path.join(part, "checkpoints", "6"), ignore_errors=True)
  s = train(cfg, part)  # resumes from step 4, rewrites metrics.jsonl from there
  assert s["step"] == 12
  resumed = read_jsonl(os.path.join(part, "metrics.jsonl"))
  assert [r["step"] for r in resumed] == list(range(1, 13))  # each step once
  got = {r["step"]: r["loss"] for r in resumed}
  for step in range(1, 13):
    assert got[step] == full[step], step  # bit-identical
  assert got[12] < got[1]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = small_run(steps=10, checkpoint_every=4)
  wd = str(tmp_path / "run")
  train(cfg, wd, stop_after=4)
  bad = with_train(cfg, z_loss=1e38)  # the same run, now with an overflowing loss
  with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 5.*"
                                               r"last good checkpoint is step 4"):
    train(bad, wd)
  ck = Checkpointer(wd)
  assert ck.all_steps() == [4]
  ck.close()
  s = train(cfg, wd)  # the good config resumes from step 4 and finishes
  assert s["step"] == 10 and np.isfinite(s["loss"])
