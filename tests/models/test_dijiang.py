"""DiJiang: the DCT projection, the feature map, and the recurrence against the official
T x T formulation (per-position factors D1 = gamma^t, D2 = gamma^-t at their initial values)."""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
from flax import nnx

import efficient_lm
from efficient_lm.layers.mixers.dijiang import dct_matrix, feature_map, group_norm, head_log_decays
from efficient_lm.layers.rope import positions
from tests.conftest import assert_rel_close


def test_dct_matrix_is_scipy_orthonormal_dct():
  for p in (4, 16, 64):
    np.testing.assert_allclose(dct_matrix(p), scipy.fft.dct(np.eye(p), axis=0, norm="ortho"), atol=1e-6)
    np.testing.assert_allclose(dct_matrix(p) @ dct_matrix(p).T, np.eye(p), atol=1e-5)


def test_feature_map_is_softmax_of_weighted_inverse_dct():
  rng = np.random.default_rng()
  p = 16
  x = rng.normal(size=(2, 3, 4, p)).astype(np.float32)
  w = rng.normal(size=(p,)).astype(np.float32)
  out = np.asarray(feature_map(jnp.asarray(x), jnp.asarray(dct_matrix(p)), jnp.asarray(w)))
  z = scipy.fft.idct(x, axis=-1, norm="ortho") * w
  ref = np.exp(z - z.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  assert_rel_close("phi", ref, out, 1e-5)


def test_decays_and_group_norm():
  np.testing.assert_allclose(np.exp(head_log_decays(4)),
                             1 - np.exp(np.linspace(np.log(1 / 32), np.log(1 / 512), 4)), rtol=1e-6)
  rng = np.random.default_rng()
  x = rng.normal(size=(2, 5, 12)).astype(np.float32)   # d = 12, p = 4 groups of 3 channels
  scale, bias = rng.normal(size=12).astype(np.float32), rng.normal(size=12).astype(np.float32)
  g = x.reshape(2, 5, 4, 3).astype(np.float64)
  inv_std = 1 / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
  ref = ((g - g.mean(-1, keepdims=True)) * inv_std).reshape(2, 5, 12) * scale + bias
  out = np.asarray(group_norm(jnp.asarray(x), 4, scale, bias, 1e-5), np.float64)
  # Each value against float32's error bound, not the array against 1e-5: a group of 3 nearly equal
  # values loses x - mean to rounding that 1 / std then multiplies (one draw in ~2e5 broke a 1e-5
  # relative check; measured over 2e5 draws: at most 0.3 of this bound). A wrong eps, group layout or
  # affine moves typical values by far more than the bound.
  amplification = np.repeat(np.abs(g).max(-1, keepdims=True) * inv_std, 3, axis=-1).reshape(2, 5, 12)
  bound = 8 * np.finfo(np.float32).eps * (amplification * np.abs(scale) + np.abs(bias))
  assert np.all(np.abs(out - ref) <= bound), np.max(np.abs(out - ref) / bound)


def test_projection_is_not_trained():
  model = efficient_lm.create_model("dijiang-tiny")
  names = {str(p[-2].key) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
  assert "dct" not in names and "w" not in names
  mixer = model.blocks[0].mixer
  assert mixer.dct[...].shape == (16, 16) and mixer.w[...].shape == (16,)


def official_txt(mixer, x_BTD):
  """The official form: (phi(Q) D1)(phi(K) D2)^T, causal mask, times V; D at their init."""
  b, t, _ = x_BTD.shape
  q, k, v = mixer._features(x_BTD, positions(None, b, t))
  gamma = jnp.exp(head_log_decays(mixer.h))                       # [H]
  steps = jnp.arange(t, dtype=jnp.float32)[:, None]
  d1, d2 = gamma ** steps, gamma ** -steps                         # [T, H]
  scores = jnp.einsum("bthp,bshp->bhts", q * d1[None, :, :, None], k * d2[None, :, :, None])
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, 0.0)
  o = jnp.einsum("bhts,bshp->bthp", scores, v.astype(jnp.float32))
  return mixer._out(o, x_BTD)


def test_recurrence_equals_official_txt_formulation():
  model = efficient_lm.create_model("dijiang-tiny")
  mixer = model.blocks[0].mixer
  x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (2, 24, 64))
  ref = official_txt(mixer, x)
  for impl in ("scan", "chunk"):
    mixer.impl = impl
    assert_rel_close(f"recurrent ({impl}) vs T x T", ref, mixer(x, None, positions(None, 2, 24)), 1e-5)
