"""The MoE expert matmuls through every ragged-dot path agree with jax.lax.ragged_dot, forward
and gradients, in float32 and bfloat16; the layer stays dropless."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_lm import kernels
from efficient_lm.layers.moe import expert_mlp, route
from tests.conftest import assert_rel_close
from tests.fastpaths.helpers import fake_tokamax, pretend

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _case(dtype, skew):
  rng = np.random.default_rng(1)
  n, d, hid, e, k = 45, 16, 24, 6, 3
  x = jnp.asarray(rng.normal(size=(n, d)), dtype)
  ws = tuple(jnp.asarray(rng.normal(size=s) * 0.3, dtype) for s in ((e, d, hid), (e, d, hid), (e, hid, d)))
  logits = jnp.asarray(rng.normal(size=(n, e)), jnp.float32)
  if skew:   # two experts take almost everything, two get nothing
    logits = logits + jnp.asarray([20.0, 12.0, 8.0, 0, -30.0, -30.0])
  _, idx, w = route(logits, k)
  return x, idx, w, ws


def _value_and_grads(impl, x, idx, w, ws):
  def f(x, wg, wu, wd):
    return expert_mlp(x, idx, w, wg, wu, wd, impl=impl)
  out = f(x, *ws)
  cot = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
  grads = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot), argnums=(0, 1, 2, 3))(x, *ws)
  return out, grads


def _dense_reference(x, idx, w, ws):
  """Float32, per token, no sorting: every token through its k experts."""
  wg, wu, wd = (a.astype(jnp.float32)[idx] for a in ws)
  x = x.astype(jnp.float32)
  h = jax.nn.silu(jnp.einsum("nd,nkdh->nkh", x, wg)) * jnp.einsum("nd,nkdh->nkh", x, wu)
  return jnp.einsum("nkh,nkhd,nk->nd", h, wd, w)


def _compare(impl_out, ref_out, dtype):
  out, grads = impl_out
  r_out, r_grads = ref_out
  assert_rel_close("moe forward", r_out.astype(jnp.float32), out.astype(jnp.float32), TOL[dtype])
  for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down"), r_grads, grads):
    assert_rel_close(f"moe {name}", a.astype(jnp.float32), b.astype(jnp.float32), TOL[dtype])
    assert float(jnp.max(jnp.abs(b.astype(jnp.float32)))) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_path_matches_dense_reference(dtype):
  x, idx, w, ws = _case(dtype, skew=True)
  out = expert_mlp(x, idx, w, *ws, impl="xla")
  assert_rel_close("dropless fused gate/up", _dense_reference(x, idx, w, ws), out.astype(jnp.float32),
                   TOL[dtype])


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_on_a_hopper_goes_through_tokamax(monkeypatch, dtype, skew):
  """The tokamax branch (faked with XLA ops here) is used for the forward and the input gradient
  of both expert matmuls, the weight gradients come from `grouped_weight_grad`, and all of it
  agrees with the XLA path (skew: two experts get no token)."""
  calls, wgrads = [], []
  pretend(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3", 9, fake_tokamax(calls))
  tiled = kernels.grouped_weight_grad
  monkeypatch.setattr(kernels, "grouped_weight_grad", lambda *a, **kw: wgrads.append(1) or tiled(*a, **kw))
  x, idx, w, ws = _case(dtype, skew)
  got = _value_and_grads("auto", x, idx, w, ws)
  assert calls.count("ragged_dot") >= 4 and len(wgrads) == 2
  pretend(monkeypatch, "cpu", "cpu", 0, None)
  _compare(got, _value_and_grads("xla", x, idx, w, ws), dtype)


@pytest.mark.parametrize("backend, kind, setting, tiled", [
    ("gpu", "NVIDIA H100 80GB HBM3", "tiled", True),
    ("gpu", "NVIDIA H100 80GB HBM3", "tokamax", False),
    ("tpu", "TPU v5 lite", "tiled", False),     # the race was seen in the Hopper kernel only
])
def test_which_weight_gradient_the_tokamax_path_takes(monkeypatch, backend, kind, setting, tiled):
  pretend(monkeypatch, backend, kind, 9, fake_tokamax([]))
  monkeypatch.setattr(kernels, "RAGGED_DOT_WEIGHT_GRAD", setting)
  wgrads = []
  real = kernels.grouped_weight_grad
  monkeypatch.setattr(kernels, "grouped_weight_grad", lambda *a, **kw: wgrads.append(1) or real(*a, **kw))
  x, idx, w, ws = _case(jnp.float32, skew=False)
  _value_and_grads("auto", x, idx, w, ws)
  assert (len(wgrads) == 2) == tiled
  monkeypatch.setattr(kernels, "RAGGED_DOT_WEIGHT_GRAD", "racy")
  with pytest.raises(ValueError, match="RAGGED_DOT_WEIGHT_GRAD"):
    _value_and_grads("auto", x, idx, w, ws)


@pytest.mark.parametrize("sizes, rows, tile", [
    ([5, 0, 13, 8, 0, 6], 32, 8), ([8, 8, 8, 8], 32, 8), ([0, 0, 32, 0], 32, 8), ([1, 2, 3, 20], 40, 8),
    ([300, 0, 17, 700], 1024, 128), ([0, 0, 0], 16, 8)])
def test_grouped_weight_grad_matches_per_group_products(sizes, rows, tile):
  """Per group, x[rows of g]^T dy[rows of g] on fresh random inputs, float64 reference: groups
  that straddle tiles, empty groups, rows past the last group (ignored)."""
  rng = np.random.default_rng(sum(sizes) + rows)
  x, dy = rng.standard_normal((rows, 7)), rng.standard_normal((rows, 5))
  got = kernels.grouped_weight_grad(jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32),
                                    jnp.asarray(sizes, jnp.int32), tile=tile)
  start = np.concatenate([[0], np.cumsum(sizes)])
  want = np.stack([x[start[g]:start[g + 1]].T @ dy[start[g]:start[g + 1]] for g in range(len(sizes))])
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(initial=1.0))


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_real_tokamax_matches_xla(dtype, skew):
  pytest.importorskip("tokamax")
  if kernels.tokamax_module() is None:
    pytest.skip("the installed tokamax does not suit this jax")
  x, idx, w, ws = _case(dtype, skew)
  _compare(_value_and_grads("tokamax", x, idx, w, ws), _value_and_grads("xla", x, idx, w, ws), dtype)
