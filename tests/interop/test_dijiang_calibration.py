"""calibrate_dijiang: the teacher's per-layer attention input/output, the per-head decay picked
on a case with a known answer, the constant gate and moment-matched GroupNorm, nothing else
touched, and its input checks. transfer_attention: its error measure, that it lowers that error
on held-out batches, trains only what it is told to, and its input checks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_lm
from efficient_lm import convert_to_dijiang
from efficient_lm.interop import dijiang as dj_mod
from efficient_lm.interop.dijiang import (
  DECAY_GRID,
  attention_transfer_error,
  calibrate_dijiang,
  teacher_attention_io,
  transfer_attention,
)
from efficient_lm.layers.mixers.dijiang import group_norm
from efficient_lm.layers.rope import positions
from pallas_kernels import gla

NEOX = dict(norm="layer", norm_eps=1e-5, parallel_residual=True, attn_bias=True, mlp_kind="gelu",
            rope_fraction=0.25, impl="scan")
B, T = 2, 64
TOKS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (B, T)), jnp.int32)
NEW = ("decay_logit", "gate", "norm_scale", "norm_bias")   # what calibration may set


def host(seed=3):
  """transformer-tiny as a GPT-NeoX host (d 64, 4 heads of 16: GroupNorm groups stay in a head),
  with random LayerNorm affines: a fresh one's zero biases leave the constant gate undefined."""
  model = efficient_lm.create_model("transformer-tiny", seed=seed, **NEOX)
  key = jax.random.key(seed)
  for i, block in enumerate(model.blocks):
    for j, norm in enumerate((block.norm1, block.norm2)):
      k1, k2 = jax.random.split(jax.random.fold_in(key, 2 * i + j))
      norm.scale.set_value(1.0 + 0.3 * jax.random.normal(k1, norm.scale[...].shape))
      norm.bias.set_value(0.2 + 0.3 * jax.random.normal(k2, norm.bias[...].shape))
  return model


def flat_state(model):
  return {"/".join(map(str, path)): np.asarray(x) for path, x in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))}


def test_teacher_attention_io_is_the_teachers_own_forward():
  teacher = host()
  io = list(teacher_attention_io(teacher, TOKS))
  assert len(io) == len(teacher.blocks)
  pos = positions(None, B, T)
  x = teacher.embed(TOKS)
  for block, (h, o) in zip(teacher.blocks, io):
    np.testing.assert_allclose(h, block.norm1(x), rtol=1e-5, atol=1e-5)
    att = block.mixer(h, None, pos)
    np.testing.assert_allclose(block.mixer.o_proj(o), att, rtol=1e-5, atol=1e-5)
    x = x + att + block.mlp(block.norm2(x))   # the parallel residual, written out
  ref = teacher(TOKS)
  np.testing.assert_allclose(teacher._logits(x), ref, rtol=1e-4, atol=1e-4)


def test_picks_the_decay_that_produced_the_teacher_output(monkeypatch):
  """A teacher whose attention output IS GroupNorm(DiJiang) under known per-head decays, times a
  random per-channel affine: the grid value that made each head must come back, per layer."""
  teacher = host()
  student = convert_to_dijiang(teacher, seed=1, learn_decay=True)
  known = [(2, 6, 24, 128), (64, 1.5, 8, 3)]
  rng = np.random.default_rng(1)
  pos = positions(None, B, T)

  def made_io(_teacher, tokens_BT):
    for block, n_H in zip(student.blocks, known):
      h = jnp.asarray(rng.normal(size=(B, T, 64)), jnp.float32)
      m = block.mixer
      gn = dj_mod.dijiang_normed_heads(m, m._features(h, pos), jnp.log1p(-1 / jnp.asarray(n_H, jnp.float32)))
      o = gn * rng.uniform(0.5, 2.0, 64) * rng.choice([-1, 1], 64) + rng.normal(size=64)
      yield h, jnp.asarray(o.reshape(B, T, 64), jnp.float32)

  monkeypatch.setattr(dj_mod, "teacher_attention_io", made_io)
  info = calibrate_dijiang(student, teacher, TOKS)
  for block, n_H, rec in zip(student.blocks, known, info):
    assert rec["decay_n"] == list(map(float, n_H))
    assert min(rec["r2"]) > 0.9999
    np.testing.assert_allclose(jax.nn.sigmoid(block.mixer.decay_logit[...]), 1 - 1 / np.asarray(n_H), rtol=1e-6)
  assert all(n in DECAY_GRID for n_H in known for n in n_H)


def test_sets_only_the_new_parameters_and_matches_the_teacher_moments():
  teacher = host()
  student = convert_to_dijiang(teacher, seed=1, learn_decay=True)
  before, teacher_before = flat_state(student), flat_state(teacher)
  info = calibrate_dijiang(student, teacher, TOKS, grid=(2, 8, 32))
  after = flat_state(student)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(any(n in k for n in NEW) for k in changed), changed
  assert all(np.array_equal(v, flat_state(teacher)[k]) for k, v in teacher_before.items())
  pos = positions(None, B, T)
  for block, (h, o_t), rec in zip(student.blocks, teacher_attention_io(teacher, TOKS), info):
    m = block.mixer
    assert set(rec["decay_n"]) <= {2.0, 8.0, 32.0} and rec["gate_constant"] == pytest.approx(float(jax.nn.silu(1.0)))
    gate = jax.nn.silu(m.gate(h))
    np.testing.assert_allclose(gate, rec["gate_constant"], rtol=1e-4)   # one constant, every token
    q, k, v = m._features(h, pos)
    o, _ = gla(q, k, v, jnp.broadcast_to(m._log_decay(), q.shape[:3]), scale=1.0, impl="scan")
    y = np.asarray(gate * group_norm(o.reshape(B, T, 64), 16, m.norm_scale[...], m.norm_bias[...], 1e-5))
    o_t = np.asarray(o_t)
    np.testing.assert_allclose(y.mean((0, 1)), o_t.mean((0, 1)), atol=2e-4)
    np.testing.assert_allclose(y.std((0, 1)), o_t.std((0, 1)), rtol=2e-3)


def test_rejects_bad_input():
  teacher = host()
  student = convert_to_dijiang(teacher, learn_decay=True)
  with pytest.raises(ValueError, match="student has fixed decays"):
    calibrate_dijiang(convert_to_dijiang(teacher), teacher, TOKS)
  with pytest.raises(ValueError, match="student must be a DiJiang"):
    calibrate_dijiang(teacher, teacher, TOKS)
  with pytest.raises(ValueError, match="teacher is not a GPT-NeoX-style host"):
    calibrate_dijiang(student, student, TOKS)
  with pytest.raises(TypeError, match="teacher must be an LM"):
    calibrate_dijiang(student, {"not": "a model"}, TOKS)
  with pytest.raises(ValueError, match="student and teacher differ"):
    calibrate_dijiang(student, efficient_lm.create_model("transformer-tiny", n_layers=1, **NEOX), TOKS)
  for bad in (TOKS[0], TOKS.astype(jnp.float32), TOKS + 256, TOKS[:, :0]):
    with pytest.raises(ValueError, match="tokens_BT"):
      calibrate_dijiang(student, teacher, bad)
  for bad in ((), (1.0, 2.0), (4, math.inf), ((2, 3),)):
    with pytest.raises(ValueError, match="grid"):
      calibrate_dijiang(student, teacher, TOKS, grid=bad)
  with pytest.raises(ValueError, match="gate_preact"):
    calibrate_dijiang(student, teacher, TOKS, gate_preact=0.0)


def random_tokens(seed, b=4, t=T):
  return np.random.default_rng(seed).integers(0, 256, (b, t)).astype(np.int32)


def calibrated(teacher):
  student = convert_to_dijiang(teacher, seed=1, learn_decay=True)
  calibrate_dijiang(student, teacher, TOKS)
  return student


def test_attention_transfer_error_is_the_normalised_mse_of_each_mixer():
  teacher = host()
  student = calibrated(teacher)
  tokens = random_tokens(9)
  pos = positions(None, 4, T)
  want = []
  for block, t_block, (h, o) in zip(student.blocks, teacher.blocks, teacher_attention_io(teacher, jnp.asarray(tokens))):
    y_t = np.asarray(t_block.mixer.o_proj(o), np.float64)
    want.append(np.mean((np.asarray(block.mixer(h, None, pos), np.float64) - y_t) ** 2) / y_t.var())
  np.testing.assert_allclose(attention_transfer_error(student, teacher, tokens), want, rtol=1e-4)


def test_transfer_lowers_the_heldout_error_of_every_layer():
  teacher = host()
  student = calibrated(teacher)
  held = random_tokens(100)
  before = np.asarray(attention_transfer_error(student, teacher, held))
  info = transfer_attention(student, teacher, lambda s: random_tokens(s), 30)
  after = np.asarray(attention_transfer_error(student, teacher, held))
  assert [r["layer"] for r in info] == [0, 1]
  assert all(r["nmse_last"] < r["nmse_first"] for r in info), info
  assert np.all(after < before) and after.sum() < 0.8 * before.sum(), (before, after)


def test_transfer_trains_only_the_named_parameters():
  teacher = host()
  student = calibrated(teacher)
  before, teacher_before = flat_state(student), flat_state(teacher)
  transfer_attention(student, teacher, lambda s: random_tokens(s), 3, train=("qkv", "gate"))
  after = flat_state(student)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  named = {k for k in before if "['mixer']" in k and ("['qkv']" in k or "['gate']" in k)}
  assert changed == named and len(named) == 6, changed   # per layer qkv kernel and bias, gate kernel
  assert all(np.array_equal(v, flat_state(teacher)[k]) for k, v in teacher_before.items())


def test_transfer_rejects_bad_arguments():
  teacher = host()
  student = calibrated(teacher)
  batch = lambda s: TOKS
  for steps in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="steps"):
      transfer_attention(student, teacher, batch, steps)
  for lr in (0.0, -1e-3, math.nan, math.inf):
    with pytest.raises(ValueError, match="lr"):
      transfer_attention(student, teacher, batch, 2, lr=lr)
  for train in ((), "qkv", ("qkv", "lm_head"), ("dct",)):
    with pytest.raises(ValueError, match="train"):
      transfer_attention(student, teacher, batch, 2, train=train)
  with pytest.raises(ValueError, match="train"):   # fixed decays are no parameter
    transfer_attention(convert_to_dijiang(teacher), teacher, batch, 2, train=("decay_logit",))
  with pytest.raises(ValueError, match="tokens_BT"):
    transfer_attention(student, teacher, lambda s: TOKS[0], 2)
  with pytest.raises(ValueError, match="student must be a DiJiang"):
    transfer_attention(teacher, teacher, batch, 2)
