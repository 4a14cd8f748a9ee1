"""MoE: dropless dispatch equals a dense per-token reference, the load-balancing loss on a
hand-checked case, the recurrent router's state carried from layer to layer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_lm
from efficient_lm.layers.moe import expert_mlp, load_balancing_loss, route, routing_stats
from tests.conftest import assert_rel_close


def dense_reference(x_ND, idx_NK, w_NK, wg, wu, wd):
  """Every token through each of its k experts, by gathering that expert's weights."""
  g, u, d = wg[idx_NK], wu[idx_NK], wd[idx_NK]                 # [N, k, ...]
  h = jax.nn.silu(jnp.einsum("nd,nkdh->nkh", x_ND, g)) * jnp.einsum("nd,nkdh->nkh", x_ND, u)
  return jnp.einsum("nkh,nkhd,nk->nd", h, d, w_NK)


@pytest.mark.parametrize("skew", [False, True])
def test_dispatch_is_dropless(skew):
  rng = np.random.default_rng()
  n, d, hid, e, k = 37, 8, 12, 5, 2
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  wg, wu, wd = (jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((e, d, hid), (e, d, hid), (e, hid, d)))
  logits = jnp.asarray(rng.normal(size=(n, e)), jnp.float32)
  if skew:   # almost every token prefers experts 0 and 1: nothing may be dropped
    logits = logits + jnp.asarray([20.0, 10.0, 0, 0, 0])
  _, idx, w = route(logits, k)
  out = expert_mlp(x, idx, w, wg, wu, wd)
  ref = dense_reference(x, idx, w, wg, wu, wd)
  assert_rel_close("dropless dispatch", ref, out, 1e-5)
  assert bool(jnp.all(jnp.linalg.norm(out, axis=-1) > 0))     # every token was processed
  loss = lambda f, a, r, *ws: jnp.sum(jnp.sin(f(a, idx, r, *ws)))
  got, ref_grads = (jax.grad(functools.partial(loss, f), argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, wd)
                    for f in (expert_mlp, dense_reference))
  for name, a, b in zip(("x", "routing weights", "w_gate", "w_up", "w_down"), ref_grads, got):
    assert_rel_close(f"dispatch gradient of {name}", a, b, 1e-5)


def test_route_renormalises_top_k():
  probs, idx, w = route(jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.1]])), 2)
  np.testing.assert_allclose(probs, [[0.5, 0.3, 0.1, 0.1]], rtol=1e-6)
  assert idx.tolist() == [[0, 1]]
  np.testing.assert_allclose(w, [[0.625, 0.375]], rtol=1e-6)


def test_route_gradient_equals_top_k_gradient():
  logits = jnp.asarray(np.random.default_rng().normal(size=(23, 6)), jnp.float32)
  cot = jnp.asarray(np.random.default_rng().normal(size=(23, 3)), jnp.float32)

  def by_top_k(lg):
    top_p, _ = jax.lax.top_k(jax.nn.softmax(lg, axis=-1), 3)
    return jnp.sum(cot * top_p / jnp.sum(top_p, -1, keepdims=True))

  got = jax.grad(lambda lg: jnp.sum(cot * route(lg, 3)[2]))(logits)
  assert_rel_close("routing-weight gradient", jax.grad(by_top_k)(logits), got, 1e-6)


def test_load_balancing_loss_hand_checked():
  # Two MoE layers of two tokens each, E = 4, k = 2, counted together.
  layer1 = jnp.asarray([[0.5, 0.3, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1]])   # picks {0,1}, {0,2}
  layer2 = jnp.asarray([[0.1, 0.1, 0.3, 0.5], [0.1, 0.2, 0.3, 0.4]])   # picks {3,2}, {3,2}
  stats = [routing_stats(p, route(jnp.log(p), 2)[1]) for p in (layer1, layer2)]
  total = jax.tree.map(lambda a, b: a + b, *stats)
  # f = counts / 4 tokens = [2, 1, 3, 2] / 4 ; P = column sums / 4 = [1.3, 0.7, 0.9, 1.1] / 4
  expected = 4 * (2 * 1.3 + 1 * 0.7 + 3 * 0.9 + 2 * 1.1) / 16
  assert float(jnp.sum(total["counts"] / total["tokens"])) == pytest.approx(2.0)   # sum_e f_e = k
  assert float(load_balancing_loss(total["counts"], total["prob_sum"], total["tokens"])) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module", params=["rmoe-tiny", "smoe-tiny"])
def moe_model(request):
  return efficient_lm.create_model(request.param)


def test_aux_loss_reported(moe_model):
  toks = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 8), 0, 256)
  _, aux = nnx.jit(lambda m, t: m(t, return_aux=True))(moe_model, toks)
  assert float(aux["moe_load_balance"]) >= moe_model.config.top_k - 1e-4   # minimum value is k
  assert float(aux["moe_aux_loss"]) == pytest.approx(moe_model.config.aux_loss_coef * float(aux["moe_load_balance"]))


def router_chain(model, h_LND):
  """Layer-by-layer router logits of the model's own routers on fixed inputs."""
  state = model._router_state(h_LND.shape[1])
  logits = []
  for block, h in zip(model.blocks, h_LND):
    out, state = block.mlp.router(h, state, model.router_cell)
    logits.append(out)
  return logits


def test_recurrent_router_carries_state_between_layers(moe_model):
  n_layers = moe_model.config.n_layers
  h = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (n_layers, 6, moe_model.config.d_model))
  before = router_chain(moe_model, h)
  router0 = moe_model.blocks[0].mlp.router
  name = "w_in" if moe_model.config.router == "recurrent" else "w"
  weight = getattr(router0, name)
  original = weight[...]
  weight[...] = original + 0.5
  after = router_chain(moe_model, h)
  weight[...] = original
  changed = float(jnp.abs(after[-1] - before[-1]).max())   # the last layer (3rd in rmoe-tiny)
  if moe_model.config.router == "recurrent":
    assert changed > 1e-6, "layer-1 router weights must change layer-3 routing"
    # and the gradient flows through the shared state
    grad = jax.grad(lambda w: jnp.sum(router_chain_with(moe_model, h, w)[2] ** 2))(original)
    assert float(jnp.abs(grad).max()) > 0
  else:
    assert changed == 0.0, "SMoE routers are independent per layer"


def router_chain_with(model, h, w_in0):
  state = model._router_state(h.shape[1])
  logits = []
  for i, (block, hl) in enumerate(zip(model.blocks, h)):
    r = block.mlp.router
    x = hl @ (w_in0 if i == 0 else r.w_in[...])
    state = model.router_cell(x, state)
    logits.append(state @ r.w_out[...])
  return logits
