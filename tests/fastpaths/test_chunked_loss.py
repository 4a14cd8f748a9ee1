"""The chunked LM loss equals the plain full-logits loss and its gradients (z-loss, masked
tokens, token counts not divisible by the chunk, tied and untied heads, fp32 and bf16), never
holds [tokens, vocab] logits, and the train step's chunked path equals its plain path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_lm
from efficient_lm import kernels
from efficient_lm.training.step import model_token_stats
from tests.conftest import assert_rel_close

TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2}


def _case(n, d, v, layout, dtype, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(rng.normal(size=(v, d) if layout == "vd" else (d, v)) * 0.5, dtype)
  targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  targets = targets.at[::3].set(jnp.argmax(kernels._head(h, w, layout), -1)[::3])   # some correct
  mask = jnp.asarray(rng.random(n) > 0.3, jnp.float32)
  return h, w, targets, mask


def _loss_and_grads(stats_fn, h, w, targets, mask, z_coef):
  def loss(h, w):
    ce, z, correct = stats_fn(h, w, targets, mask)
    return (ce + z_coef * z) / jnp.sum(mask), (ce, z, correct)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)


@pytest.mark.parametrize("n, chunk", [(37, 8), (64, 16), (5, 1024), (1, 3)])
@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_equals_plain(dtype, layout, n, chunk):
  h, w, targets, mask = _case(n, 24, 301, layout, dtype)
  mask = mask.at[0].set(1.0)
  z_coef = 1e-2
  (l0, (ce0, z0, c0)), g0 = _loss_and_grads(
      lambda *a: kernels.plain_token_stats(*a, w_layout=layout), h, w, targets, mask, z_coef)
  (l1, (ce1, z1, c1)), g1 = _loss_and_grads(
      lambda *a: kernels.chunked_token_stats(*a, w_layout=layout, chunk_size=chunk), h, w, targets, mask, z_coef)
  for name, a, b in (("loss", l0, l1), ("ce", ce0, ce1), ("z", z0, z1)):
    assert_rel_close(name, a, b, 1e-6)     # forward in float32 on both paths
  assert float(c0) == float(c1) and (n < 3 or float(c0) > 0)
  for name, a, b in (("dh", g0[0], g1[0]), ("dw", g0[1], g1[1])):
    assert b.dtype == a.dtype
    assert_rel_close(name, a.astype(jnp.float32), b.astype(jnp.float32), TOL[dtype])


def test_masked_tokens_get_no_gradient_and_z_loss_counts():
  h, w, targets, mask = _case(20, 8, 50, "dv", jnp.float32)
  stats = lambda *a: kernels.chunked_token_stats(*a, w_layout="dv", chunk_size=6)
  (_, _), (dh, _) = _loss_and_grads(stats, h, w, targets, mask, 0.5)
  np.testing.assert_array_equal(np.asarray(dh)[np.asarray(mask) == 0], 0.0)
  assert np.all(np.abs(np.asarray(dh)[np.asarray(mask) == 1]).sum(-1) > 0)
  (_, _), (dh_no_z, _) = _loss_and_grads(stats, h, w, targets, mask, 0.0)
  assert float(jnp.max(jnp.abs(dh - dh_no_z))) > 1e-3


def _largest_intermediate(fn, *args):
  """Elements of the largest array any equation (sub-jaxprs included) makes."""
  def walk(jaxpr):
    best = 0
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            best = max(best, walk(inner))
    return best
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_never_materialises_tokens_by_vocab():
  n, d, v, chunk = 512, 16, 1000, 64
  h, w, targets, mask = _case(n, d, v, "vd", jnp.bfloat16)
  grad = lambda f: jax.grad(lambda h, w: sum(f(h, w, targets, mask)[:2]), argnums=(0, 1))
  plain = _largest_intermediate(grad(lambda *a: kernels.plain_token_stats(*a, w_layout="vd")), h, w)
  chunked = _largest_intermediate(grad(lambda *a: kernels.chunked_token_stats(*a, w_layout="vd", chunk_size=chunk)),
                                  h, w)
  assert plain >= n * v                      # the check sees the full logits when they exist
  assert chunk * v <= chunked <= max(chunk * v, v * d)   # one chunk's logits (seen inside the scan)


@pytest.mark.parametrize("tie", [True, False])
def test_train_step_chunked_equals_plain(tie):
  model = efficient_lm.create_model("smoe-tiny", tie_embeddings=tie)
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(3)
  b, t = 2, 24
  inputs = jnp.asarray(rng.integers(0, 256, (b, t)), jnp.int32)
  batch = {"inputs": inputs, "targets": jnp.roll(inputs, -1, axis=1),
           "segment_ids": jnp.asarray(np.repeat([[1, 2, 0], [1, 1, 1]], [10, 9, 5], axis=1), jnp.int32)}
  batch["loss_mask"] = (batch["segment_ids"] > 0).astype(jnp.float32)   # segment 0: padding

  def loss(params, chunk):
    (ce, z, correct), aux = model_token_stats(gd, params, rest, batch, True, chunk)
    return (ce + 1e-3 * z) / jnp.sum(batch["loss_mask"]) + aux, (ce, correct)

  (l0, (ce0, c0)), g0 = jax.value_and_grad(loss, has_aux=True)(params, 0)
  (l1, (ce1, c1)), g1 = jax.value_and_grad(loss, has_aux=True)(params, 7)
  assert_rel_close("loss", l0, l1, 1e-6)
  assert_rel_close("ce", ce0, ce1, 1e-6)
  assert float(c0) == float(c1)
  for a, b_ in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert_rel_close("param grad", a, b_, 1e-5)


def test_hidden_and_head_weight_reproduce_logits():
  for tie in (True, False):
    model = efficient_lm.create_model("transformer-tiny", tie_embeddings=tie)
    toks = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 9)), jnp.int32)
    h = model.hidden(toks)
    w, layout = model.head_weight()
    assert layout == ("vd" if tie else "dv")
    logits = kernels._head(h.reshape(-1, h.shape[-1]), w, layout).reshape(2, 9, -1)
    assert_rel_close("hidden @ head", model(toks), logits, 1e-6)
