"""Shared, compiled-once pieces for the model tests: one model per preset, jitted functions
over its (graphdef, state) split, and a next-token loss."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import efficient_lm
from efficient_lm.models import LM

# Every block kind's tiny preset plus the MoE and hybrid ones.
TINY = ["transformer-tiny", "rodimus-tiny", "rodimus_plus-tiny", "deltanet-tiny", "gated_deltanet-tiny",
        "gla-tiny", "linear_attention-tiny", "dijiang-tiny", "smoe-tiny", "rmoe-tiny", "deltanet_swa-tiny",
        "deltanet_attn-tiny"]


def tokens(key, shape, vocab=256):
  return jax.random.randint(jax.random.key(key), shape, 0, vocab)


def next_token_loss(logits_BTV, tokens_BT):
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1], tokens_BT[:, 1:]).mean()


class Compiled:
  """A tiny model and jitted forward / prefill / decode / loss-and-grad functions."""

  def __init__(self, name, **overrides):
    self.model = efficient_lm.create_model(name, **overrides)
    self.cfg = self.model.config
    self.graphdef, self.params, self.rest = nnx.split(self.model, nnx.Param, ...)
    gd = self.graphdef
    self.forward = jax.jit(lambda p, r, t, s: nnx.merge(gd, p, r)(t, s))
    self.prefill = jax.jit(lambda p, r, t, n: nnx.merge(gd, p, r).prefill(t, n), static_argnums=3)
    self.decode = jax.jit(lambda p, r, t, c: nnx.merge(gd, p, r).decode(t, c))
    self.grad = self.make_grad(gd)

  @staticmethod
  def make_grad(graphdef):
    def loss(params, rest, toks, seg):
      logits, aux = nnx.merge(graphdef, params, rest)(toks, seg, return_aux=True)
      return next_token_loss(logits, toks) + aux["moe_aux_loss"], logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  def with_impl(self, impl):
    """The same parameters under another recurrence form (the graphdef holds `impl`)."""
    cfg = efficient_lm.get_config(self.cfg, impl=impl)
    abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    return self.make_grad(nnx.split(abstract, nnx.Param, ...)[0])


@functools.lru_cache(maxsize=None)
def compiled(name, **overrides) -> Compiled:
  return Compiled(name, **overrides)


def tree_rel_err(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  f64 = lambda x: np.asarray(x, np.float64)
  num = sum(float(np.sum((f64(x) - f64(y)) ** 2)) for x, y in zip(la, lb))
  den = sum(float(np.sum(f64(y) ** 2)) for y in lb)
  return float(np.sqrt(num / max(den, 1e-30)))
