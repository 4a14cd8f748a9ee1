"""Attention through every path equals the written-out mask of models.md (query t sees key s iff
0 <= t - s <= w, same segment), forward and gradients, in float32 and bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_lm import kernels
from efficient_lm.layers.attention import Attention
from tests.conftest import assert_rel_close
from tests.fastpaths.helpers import fake_tokamax, pretend, reference_attention

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
CASES = [  # (n_heads, n_kv_heads, window, segments)
    (4, 4, None, False), (4, 2, None, True), (4, 4, 3, False), (4, 1, 5, True), (2, 2, 0, False),
    (2, 2, 40, True)]


def _case(dtype, n, kv, segments):
  rng = np.random.default_rng(2)
  b, t, h = 2, 19, 16
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
  k = jnp.asarray(rng.normal(size=(b, t, kv, h)), dtype)
  v = jnp.asarray(rng.normal(size=(b, t, kv, h)), dtype)
  seg = jnp.asarray(np.repeat([[0, 1, 2], [0, 0, 1]], [7, 5, 7], axis=1), jnp.int32) if segments else None
  return q, k, v, seg


def _run(fn, q, k, v):
  out = fn(q, k, v)
  cot = jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
  grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot), argnums=(0, 1, 2))(q, k, v)
  return out, grads


def _check(impl, dtype, n, kv, window, segments):
  q, k, v, seg = _case(dtype, n, kv, segments)
  mask = None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]
  scale = 0.25
  got = _run(lambda q, k, v: kernels.dot_product_attention(q, k, v, mask=mask, is_causal=True, window=window,
                                                           scale=scale, impl=impl), q, k, v)
  ref = _run(lambda q, k, v: reference_attention(q, k, v, seg, window, scale), q, k, v)
  for name, a, b in zip(("out", "dq", "dk", "dv"), (ref[0],) + ref[1], (got[0],) + got[1]):
    assert_rel_close(f"{impl} {name}", a.astype(jnp.float32), b.astype(jnp.float32), TOL[dtype])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_path(dtype, case):
  _check("xla", dtype, *case)


@pytest.mark.parametrize("case", CASES[2:4])
def test_auto_on_tpu_goes_through_tokamax(monkeypatch, case):
  calls = []
  pretend(monkeypatch, "tpu", "TPU v5 lite", 0, fake_tokamax(calls))
  _check("auto", jnp.bfloat16, *case)
  assert "attention" in calls


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_real_tokamax_path(dtype, case):
  pytest.importorskip("tokamax")
  if kernels.tokamax_module() is None:
    pytest.skip("the installed tokamax does not suit this jax")
  _check("tokamax", dtype, *case)


@pytest.mark.parametrize("window", [None, 4])
def test_attention_layer_same_on_every_path(monkeypatch, window):
  """The layer (SW-SKA form: one shared key head) gives one answer whichever kernel is chosen."""
  from flax import nnx
  layer = Attention(32, 4, 1, 4, 8, window=window, rope_base=10000.0, rope_fraction=1.0, rngs=nnx.Rngs(0),
                    dtype=jnp.float32, param_dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(1), (2, 12, 32))
  seg = jnp.asarray([[0] * 5 + [1] * 7, [0] * 12])
  pos = jnp.asarray([list(range(5)) + list(range(7)), list(range(12))])
  base = layer(x, seg, pos)
  calls = []
  pretend(monkeypatch, "tpu", "TPU v5 lite", 0, fake_tokamax(calls))
  assert_rel_close("layer via tokamax branch", base, layer(x, seg, pos), 1e-6)
  assert calls == ["attention"]
