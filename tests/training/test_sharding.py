"""The logical-axis table, mesh construction, and an 8-device (fsdp=4, data=2) train step equal
to the single-device one with parameters actually sharded."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from efficient_lm import sharding as shd
from efficient_lm.data.pipeline import Data
from efficient_lm.training.loop import build, resolve_model_config
from tests.conftest import assert_rel_close
from tests.training.helpers import small_run


def test_mesh_shapes():
  assert shd.mesh_shape(shd.MeshConfig(data=2, fsdp=-1, tensor=1), 8) == (2, 4, 1)
  assert shd.mesh_shape(shd.MeshConfig(data=1, fsdp=2, tensor=-1), 8) == (1, 2, 4)
  with pytest.raises(ValueError, match="needs 6 devices"):
    shd.mesh_shape(shd.MeshConfig(data=2, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one"):
    shd.mesh_shape(shd.MeshConfig(data=-1, fsdp=-1, tensor=1), 8)
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=4, tensor=1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_logical_table():
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4, tensor=2))
  assert shd.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  assert shd.logical_to_spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
  assert shd.logical_to_spec(("embed", "mlp"), (6, 128), mesh) == P(None, "tensor")  # 6 % 4
  assert shd.logical_to_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)
  assert shd.logical_to_spec(None) == P()
  assert shd.batch_sharding(mesh).spec == P("fsdp", None)
  with pytest.raises(KeyError, match="no rule"):
    shd.logical_to_spec(("bogus",))


def _run(devices, mesh_cfg, steps=3):
  import dataclasses
  cfg = dataclasses.replace(small_run(), mesh=mesh_cfg)
  data = Data(cfg.data)
  setup = build(cfg, resolve_model_config(cfg, data.vocab_size), shd.make_mesh(mesh_cfg, devices))
  state, rest = setup.init()
  it = data.train_iterator(cfg.train.batch_size)
  losses = []
  for _ in range(steps):
    state, m = setup.train_step(state, shd.global_batch(next(it), setup.batch_sharding), rest)
    losses.append(float(m["loss"]))
  return losses, state


def test_sharded_step_equals_single_device():
  assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
  ref_losses, ref_state = _run(jax.devices()[:1], shd.MeshConfig(1, 1, 1))
  losses, state = _run(jax.devices(), shd.MeshConfig(data=2, fsdp=4, tensor=1))
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert ref_losses[-1] < ref_losses[0]
  n_sharded = 0
  for a, b in zip(jax.tree.leaves(ref_state["params"]), jax.tree.leaves(state["params"])):
    assert_rel_close("params", np.asarray(a), np.asarray(b), 1e-4)
    if any(s is not None for s in b.sharding.spec):
      n_sharded += 1
      assert b.addressable_shards[0].data.size < b.size
  assert n_sharded >= 3, "parameters should be split over the fsdp axis"
  # Adam moments follow their parameters' sharding
  mu = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "ndim", 0) >= 2]
  assert any(any(s is not None for s in x.sharding.spec) for x in mu)
