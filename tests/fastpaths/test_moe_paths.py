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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_on_a_hopper_goes_through_tokamax(monkeypatch, dtype):
  """The tokamax branch (faked with XLA ops here) is used twice per layer and differentiates."""
  calls = []
  pretend(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3", 9, fake_tokamax(calls))
  x, idx, w, ws = _case(dtype, skew=False)
  got = _value_and_grads("auto", x, idx, w, ws)
  assert calls.count("ragged_dot") >= 2
  pretend(monkeypatch, "cpu", "cpu", 0, None)
  _compare(got, _value_and_grads("xla", x, idx, w, ws), dtype)


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_real_tokamax_matches_xla(dtype, skew):
  pytest.importorskip("tokamax")
  if kernels.tokamax_module() is None:
    pytest.skip("the installed tokamax does not suit this jax")
  x, idx, w, ws = _case(dtype, skew)
  _compare(_value_and_grads("tokamax", x, idx, w, ws), _value_and_grads("xla", x, idx, w, ws), dtype)
