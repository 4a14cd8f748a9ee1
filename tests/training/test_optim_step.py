"""Schedule values, the weight-decay mask, and gradient accumulation equal to the big batch."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_lm import sharding as shd
from efficient_lm.training.loop import build, resolve_model_config
from efficient_lm.training.optim import OptimConfig, lr_schedule, weight_decay_mask
from efficient_lm.data.pipeline import Data
from tests.conftest import assert_rel_close
from tests.training.helpers import small_run, with_train


def test_schedule_warmup_cosine_floor():
  cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  s = lr_schedule(cfg, total_steps=110)
  np.testing.assert_allclose([float(s(i)) for i in range(10)], np.arange(1, 11) / 10, rtol=1e-6)
  assert float(s(10)) == pytest.approx(1.0)
  # halfway through the cosine: the mean of peak and floor
  assert float(s(10 + 99 / 2)) == pytest.approx(0.55, rel=1e-5)
  assert float(s(109)) == pytest.approx(0.1, rel=1e-5)
  assert float(s(500)) == pytest.approx(0.1, rel=1e-5)  # the floor holds after the end
  vals = [float(s(i)) for i in range(10, 110)]
  assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_weight_decay_mask_skips_vectors_and_embedding():
  import efficient_lm
  from flax import nnx
  params = nnx.to_pure_dict(nnx.state(efficient_lm.abstract_model("deltanet-tiny"), nnx.Param))
  mask = weight_decay_mask(params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  shapes = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
  assert any(flat.values()) and not all(flat.values())
  for k, decayed in flat.items():
    if len(shapes[k]) < 2:
      assert not decayed, k


def _setup(cfg, devices):
  data = Data(cfg.data)
  mesh = shd.make_mesh(cfg.mesh, devices)
  setup = build(cfg, resolve_model_config(cfg, data.vocab_size), mesh)
  return data, setup


def test_grad_accumulation_equals_big_batch():
  base = with_train(small_run(), batch_size=8, grad_accum=1)
  data, big = _setup(base, jax.devices()[:1])
  _, acc = _setup(with_train(base, grad_accum=4), jax.devices()[:1])
  batch = next(data.train_iterator(8))
  batch["loss_mask"][:3] = 0.0  # uneven token counts per micro-batch must not matter
  s0, rest = big.init()
  s1, _ = acc.init()
  out = {}
  for name, setup, state in (("big", big, s0), ("accum", acc, s1)):
    for _ in range(2):
      state, m = setup.train_step(state, shd.global_batch(batch, setup.batch_sharding), rest)
    out[name] = (jax.device_get(state["params"]), jax.device_get(m))
  (p_big, m_big), (p_acc, m_acc) = out["big"], out["accum"]
  assert m_big["loss"] == pytest.approx(m_acc["loss"], rel=1e-5)
  assert m_big["grad_norm"] == pytest.approx(m_acc["grad_norm"], rel=1e-4)
  for a, b in zip(jax.tree.leaves(p_big), jax.tree.leaves(p_acc)):
    assert_rel_close("params", a, b, 1e-5)
  # and the update is not trivially zero
  p_init = jax.device_get(big.init()[0]["params"])
  assert max(float(np.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(p_big), jax.tree.leaves(p_init))) > 1e-4


def test_nonfinite_step_leaves_state_unchanged():
  cfg = dataclasses.replace(small_run(), train=dataclasses.replace(small_run().train, z_loss=1e38))
  data, setup = _setup(cfg, jax.devices()[:1])
  state, rest = setup.init()
  before = jax.device_get(state)
  state, m = setup.train_step(state, shd.global_batch(next(data.train_iterator(8)),
                                                      setup.batch_sharding), rest)
  assert not bool(m["finite"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state))):
    np.testing.assert_array_equal(a, b)
