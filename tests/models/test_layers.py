"""Layer pieces against direct references: windowed / shared-key attention, the causal conv and
its segment restarts, RoPE, per-segment positions, and the size of decode states."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_lm
from efficient_lm.layers.attention import Attention
from efficient_lm.layers.conv import causal_conv
from efficient_lm.layers.rope import apply_rope, positions, segment_positions
from efficient_lm.models import decode_state_growth
from tests.conftest import assert_rel_close, rel_err


@pytest.mark.parametrize("n_k_heads, window", [(1, 3), (4, None), (2, 5)])
def test_attention_matches_masked_softmax(n_k_heads, window):
  b, t, d, h, hd = 2, 13, 32, 4, 8
  attn = Attention(d, h, n_k_heads, h if n_k_heads == 1 else n_k_heads, hd, window=window, rope_base=10000.0,
                   rope_fraction=1.0, rngs=nnx.Rngs(np.random.randint(1 << 30)), dtype="float32",
                   param_dtype="float32")
  x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (b, t, d))
  seg = jnp.asarray([[0] * 6 + [1] * 7, [0] * 13])
  pos = positions(seg, b, t)
  q, k, v = attn._qkv(x, pos)
  k = jnp.repeat(k, h // k.shape[2], axis=2)
  v = jnp.repeat(v, h // v.shape[2], axis=2)
  ti, si = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  allowed = (ti - si >= 0) & ((ti - si <= window) if window else True)
  allowed = allowed[None] & (seg[:, :, None] == seg[:, None, :])
  scores = jnp.einsum("bthd,bshd->bhts", q, k) * hd ** -0.5
  probs = jax.nn.softmax(jnp.where(allowed[:, None], scores, -jnp.inf), axis=-1)
  ref = attn.o_proj(jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, -1))
  assert_rel_close("attention", ref, attn(x, seg, pos), 1e-5)


def test_causal_conv_torch_convention_and_segments():
  rng = np.random.default_rng()
  x = rng.normal(size=(1, 9, 3)).astype(np.float32)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (3, 0), (0, 0)))
  ref = sum(w[j] * xp[:, j:j + 9] for j in range(4))        # torch Conv1d(padding=3)[..., :T]
  assert_rel_close("conv", ref, causal_conv(jnp.asarray(x), jnp.asarray(w)), 1e-6)
  seg = jnp.asarray([[0] * 4 + [1] * 5])
  out = np.asarray(causal_conv(jnp.asarray(x), jnp.asarray(w), seg))
  alone = np.asarray(causal_conv(jnp.asarray(x[:, 4:]), jnp.asarray(w)))
  assert_rel_close("conv restarts at a boundary", alone, out[:, 4:], 1e-6)


def test_rope_is_relative_and_positions_restart():
  rng = np.random.default_rng()
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
  dot = lambda m, n: float(jnp.sum(apply_rope(q, jnp.full((1, 1), m), 1e4, 16) * apply_rope(k, jnp.full((1, 1), n), 1e4, 16)))
  # Bounded by |q||k|, not by the dot product, which can cancel to ~1e-3 of it (one draw in 500 did,
  # failing a 1e-4 relative check): float32 rounds the angles at position ~104 to ~104 eps each
  # (measured over 20,000 draws: |difference| <= 3.7e-7 |q||k|); leaking the absolute position
  # moves the product by O(|q||k|).
  bound = 104 * np.finfo(np.float32).eps * float(jnp.linalg.norm(q) * jnp.linalg.norm(k))
  assert abs(dot(7, 3) - dot(104, 100)) <= bound
  partial = apply_rope(q, jnp.full((1, 1), 5), 1e4, 4)
  np.testing.assert_array_equal(partial[..., 4:], q[..., 4:])
  assert segment_positions(jnp.asarray([[5, 5, 5, 2, 2, 9]])).tolist() == [[0, 1, 2, 0, 1, 0]]


@pytest.mark.parametrize("kind, grows", [("transformer", True), ("rodimus", False), ("rodimus_plus", False),
                                         ("deltanet", False), ("gated_deltanet", False), ("gla", False),
                                         ("linear_attention", False), ("dijiang", False)])
def test_decode_state_constant_unless_global_attention(kind, grows):
  cfg = efficient_lm.get_config(f"{kind}-tiny")
  fixed, per_token = decode_state_growth(cfg)
  assert (per_token > 0) == grows and fixed >= 0


@pytest.mark.parametrize("short_conv", [False, True])
def test_gla_mixer_convs_decode_and_segments(short_conv):
  """GLA with and without FLA's optional short convs: prefill + one-token steps equal the forward,
  and packed segments equal separate runs. The conv weights are scaled up from FLA's N(0, 0.02) so
  the layer's output is not swamped by its norm's epsilon at init (it would be ~1e-4 of scale)."""
  from efficient_lm.layers.mixers.gla import GLA
  cfg = efficient_lm.get_config("gla-tiny", use_short_conv=short_conv)
  mixer = GLA(cfg, rngs=nnx.Rngs(np.random.randint(1 << 30)))
  assert (mixer.convs is not None) == short_conv
  if short_conv:
    for conv in mixer.convs:
      conv.weight[...] = conv.weight[...] * 25.0
  b, t, d = 2, 21, cfg.d_model
  x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (b, t, d))
  full = mixer(x, None, None)
  head, state = mixer.prefill(x[:, :13], None, t)
  steps = [head]
  for i in range(13, t):
    y, state = mixer.step(x[:, i], state, i)
    steps.append(y[:, None])
  assert_rel_close("prefill + steps", full, jnp.concatenate(steps, axis=1), 1e-4)
  seg = jnp.asarray([[1] * 9 + [2] * 12] * b)
  packed = mixer(x, seg, None)
  separate = jnp.concatenate([mixer(x[:, :9], None, None), mixer(x[:, 9:], None, None)], axis=1)
  assert_rel_close("packed segments", separate, packed, 1e-4)
  assert rel_err(full[:, 9:], packed[:, 9:]) > 1e-2     # without the ids the second segment differs


@pytest.mark.parametrize("n_q, n_kv, window, segments", [(4, 4, None, False), (4, 2, 5, True), (2, 1, 3, False)])
def test_attention_dropout_path(n_q, n_kv, window, segments):
  """The training path with dropout on the probabilities: at rate 0 it is the XLA attention
  (causal, window, segments, grouped heads); at rate 0.5 one key changes it, and the mean over
  keys returns to it (inverted dropout keeps the expectation)."""
  from efficient_lm import kernels
  from efficient_lm.layers.attention import attention_with_dropout
  b, t, hd = 2, 11, 8
  keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
  q = jax.random.normal(keys[0], (b, t, n_q, hd))
  k, v = (jax.random.normal(kk, (b, t, n_kv, hd)) for kk in jax.random.split(keys[1]))
  seg = jnp.asarray([[0] * 5 + [1] * 6, [0] * t])
  mask = (seg[:, :, None] == seg[:, None, :])[:, None] if segments else None
  ref = kernels.dot_product_attention(q, k, v, mask=mask, is_causal=True, window=window, scale=hd ** -0.5,
                                      impl="xla")
  run = lambda rate, key: attention_with_dropout(q, k, v, mask=mask, window=window, scale=hd ** -0.5,
                                                 dropout=(rate, key))
  assert_rel_close("rate 0", ref, run(0.0, keys[2]), 1e-5)
  one = run(0.5, keys[2])
  assert rel_err(one, ref) > 0.1
  np.testing.assert_array_equal(one, run(0.5, keys[2]))        # the key decides the mask
  mean = jnp.mean(jax.vmap(lambda kk: run(0.5, kk))(jax.random.split(keys[2], 2000)), axis=0)
  assert_rel_close("mean over keys", ref, mean, 0.05)


def test_attention_dropout_in_the_model_only_in_training():
  cfg = dict(attention_dropout=0.3, dropout=0.0)
  model = efficient_lm.create_model("transformer-tiny", **cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  plain = model(tokens)
  np.testing.assert_array_equal(plain, efficient_lm.create_model("transformer-tiny")(tokens))
  trained = model(tokens, dropout_key=jax.random.key(1))
  assert rel_err(trained, plain) > 1e-3
  np.testing.assert_array_equal(trained, model(tokens, dropout_key=jax.random.key(1)))
  no_softmax = efficient_lm.create_model("deltanet-tiny", **cfg)   # no softmax attention: nothing to drop
  np.testing.assert_array_equal(no_softmax(tokens), no_softmax(tokens, dropout_key=jax.random.key(1)))
  assert efficient_lm.get_config("transformer-tiny", **cfg).uses_dropout
  with pytest.raises(ValueError, match="attention_dropout"):
    efficient_lm.get_config("transformer-tiny", attention_dropout=1.0)
