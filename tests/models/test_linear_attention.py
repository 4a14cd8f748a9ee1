"""Plain linear attention: the mixer against the direct T x T masked formulation (every feature
map and recurrence form), the feature-map validation, and a hybrid layer pattern."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_lm
from efficient_lm.configs import ModelConfig
from efficient_lm.layers.mixers.linear_attention import LinearAttention
from tests.conftest import assert_rel_close, rel_err
from tests.models.helpers import compiled, tokens

# Written out again here (float64 numpy) so a wrong map in the module cannot pass by agreeing with itself.
PHI = {"elu": lambda x: np.where(x > 0, x + 1.0, np.exp(x)),
       "relu": lambda x: np.maximum(x, 0.0),
       "identity": lambda x: x}


def masked_reference(mixer, x_BTD, seg_BT, phi, strict=False):
  """y = W_o rmsnorm( (mask * phi(Q) phi(K)^T * K^-0.5) V ) per head, in float64; the mask keeps
  s <= t (s < t with `strict`) within one segment."""
  f64 = lambda a: np.asarray(a, np.float64)
  x = f64(x_BTD)
  b, t, _ = x.shape
  h, kd, vd = mixer.h, mixer.kd, mixer.vd
  q = phi(x @ f64(mixer.q_proj.kernel[...])).reshape(b, t, h, kd)
  k = phi(x @ f64(mixer.k_proj.kernel[...])).reshape(b, t, h, kd)
  v = (x @ f64(mixer.v_proj.kernel[...])).reshape(b, t, h, vd)
  ti, si = np.arange(t)[:, None], np.arange(t)[None, :]
  mask = ((ti > si) if strict else (ti >= si))[None] & (seg_BT[:, :, None] == seg_BT[:, None, :])
  scores = np.einsum("bthk,bshk->bhts", q, k) * kd ** -0.5 * mask[:, None]
  o = np.einsum("bhts,bshv->bthv", scores, v)
  o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + mixer.o_norm.eps) * f64(mixer.o_norm.scale[...])
  return o.reshape(b, t, h * vd) @ f64(mixer.o_proj.kernel[...])


@pytest.mark.parametrize("impl", ["scan", "chunk", "pallas"])
@pytest.mark.parametrize("fmap", ["elu", "relu", "identity"])
def test_mixer_matches_masked_formulation(fmap, impl):
  # init_std 0.2 puts the projections at O(1), where the three maps differ strongly.
  cfg = efficient_lm.get_config("linear_attention-tiny", d_model=32, n_heads=2, feature_map=fmap, impl=impl,
                                chunk_size=8, init_std=0.2)
  mixer = LinearAttention(cfg, rngs=nnx.Rngs(np.random.randint(1 << 30)))
  b, t = 2, 21   # not a multiple of the chunk size
  x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (b, t, cfg.d_model))
  seg = np.asarray([[0] * 5 + [1] * 9 + [2] * 7, [4] * t])
  out = np.asarray(mixer(x, jnp.asarray(seg), None))
  assert_rel_close(f"linear attention ({fmap}, {impl})", masked_reference(mixer, x, seg, PHI[fmap]), out, 1e-5)
  # The tolerance is tight enough to catch a wrong map or a mask that drops the diagonal.
  for other in set(PHI) - {fmap}:
    assert rel_err(out, masked_reference(mixer, x, seg, PHI[other])) > 1e-2, other
  assert rel_err(out, masked_reference(mixer, x, seg, PHI[fmap], strict=True)) > 1e-2
  assert rel_err(out, masked_reference(mixer, x, np.zeros_like(seg), PHI[fmap])) > 1e-2


def test_invalid_feature_map_raises_naming_the_field():
  with pytest.raises(ValueError, match="feature_map"):
    efficient_lm.create_model("linear_attention-tiny", feature_map="softmax")
  bad = ModelConfig(kind="linear_attention", feature_map="exp")
  with pytest.raises(ValueError, match="feature_map"):   # the mixer checks too, without validate()
    LinearAttention(bad, rngs=nnx.Rngs(0))


def test_hybrid_with_sliding_attention_decodes_like_forward():
  cm = compiled("linear_attention-tiny", layer_pattern=("linear_attention", "swa"), window=8)
  t = 20
  toks = tokens(np.random.randint(1 << 30), (2, t))
  full = cm.forward(cm.params, cm.rest, toks, jnp.zeros((2, t), jnp.int32))
  logits, cache = cm.prefill(cm.params, cm.rest, toks[:, :11], t)
  outs = [logits]
  for i in range(11, t):
    step, cache = cm.decode(cm.params, cm.rest, toks[:, i:i + 1], cache)
    outs.append(step)
  assert_rel_close("hybrid prefill+decode", full, jnp.concatenate(outs, axis=1), 1e-5)
  assert cache["layers"][0]["mixer"]["state"].shape == (2, 4, 16, 16)
