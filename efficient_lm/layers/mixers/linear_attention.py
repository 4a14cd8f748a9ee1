"""Plain causal linear attention (FLA's `LinearAttention` layer, recurrences.md section 1: GLA with
no decay).

    q, k, v = W_q h, W_k h, W_v h                      (no biases; expand_k, expand_v of d_model)
    o = gla(phi(q), phi(k), v, g=None, scale=K^-0.5)   i.e. o_t = K^-0.5 sum_{s<=t} (phi(q_t).phi(k_s)) v_s
    y = W_o rmsnorm(o)                                 (one [V] norm weight shared by heads)

Feature map `phi` (config field `feature_map`, applied in float32 to q and k alike):
- "elu" (default): `elu(x) + 1`, the positive map of Katharopoulos et al. (2020), so every score
  phi(q).phi(k) is positive and the state is a sum of nonnegative-weighted values;
- "relu": `relu(x)`, also nonnegative but can zero a whole key;
- "identity": `x` (FLA's `feature_map="identity"`: scores are plain dot products).
FLA's default, the learned Hadamard map, is left out: it adds parameters and no peer checkpoint
of this layer is loaded here.

No normalisation over keys (no `o_t / (phi(q_t) . sum_{s<=t} phi(k_s))` denominator), as FLA's
default (`do_feature_map_norm=False`): that denominator is one positive scalar per token and
head, and the per-head RMSNorm that follows removes any such scalar anyway (up to its eps), so it
would only add a second cumulative sum and, for "identity" or "relu", a division by a value that
can be zero or negative. The RMSNorm is what keeps the output scale bounded as t grows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.configs.base import FEATURE_MAPS
from efficient_lm.layers.core import Dense, normal
from efficient_lm.layers.norms import RMSNorm
from pallas_kernels import gla, gla_step


_PHI = {"elu": lambda x: jax.nn.elu(x) + 1.0, "relu": jax.nn.relu, "identity": lambda x: x}
assert tuple(_PHI) == FEATURE_MAPS


def feature_map_fn(kind: str):
  """phi of the module docstring, applied in float32."""
  if kind not in _PHI:
    raise ValueError(f"feature_map: expected one of {FEATURE_MAPS}, got {kind!r}")
  phi = _PHI[kind]
  return lambda x: phi(x.astype(jnp.float32))


class LinearAttention(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.n_heads
    key_dim, value_dim = int(d * cfg.expand_k), int(d * cfg.expand_v)
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    std = normal(cfg.init_std)
    self.q_proj = Dense(d, key_dim, ("embed", "heads"), kernel_init=std, **kw)
    self.k_proj = Dense(d, key_dim, ("embed", "heads"), kernel_init=std, **kw)
    self.v_proj = Dense(d, value_dim, ("embed", "heads"), kernel_init=std, **kw)
    self.o_norm = RMSNorm(value_dim // h, cfg.norm_eps, rngs=rngs, dtype=jnp.float32, param_dtype=jnp.float32)
    self.o_proj = Dense(value_dim, d, ("heads", "embed"), kernel_init=std, **kw)
    self.h, self.kd, self.vd = h, key_dim // h, value_dim // h
    self.phi = feature_map_fn(cfg.feature_map)   # a bad name fails at build time, not at the first call
    self.impl, self.chunk_size = cfg.impl, cfg.chunk_size
    self.dtype = jnp.dtype(cfg.dtype)

  def _project(self, x):
    """Per-head phi(q), phi(k) (back in the compute dtype for the kernel) and v."""
    lead = x.shape[:-1]
    phi = lambda y: self.phi(y.reshape(*lead, self.h, self.kd)).astype(self.dtype)
    return phi(self.q_proj(x)), phi(self.k_proj(x)), self.v_proj(x).reshape(*lead, self.h, self.vd)

  def _out(self, o):
    o = self.o_norm(o.astype(jnp.float32))
    return self.o_proj(o.reshape(*o.shape[:-2], -1))

  def _forward(self, x_BTD, seg_BT, want_state):
    q, k, v = self._project(x_BTD)
    o, state = gla(q, k, v, None, scale=self.kd ** -0.5, segment_ids=seg_BT, return_final_state=want_state,
                   impl=self.impl, chunk_size=self.chunk_size)
    return self._out(o), {"state": state}

  def __call__(self, x_BTD, seg_BT, pos_BT):
    return self._forward(x_BTD, seg_BT, False)[0]

  def prefill(self, x_BTD, pos_BT, max_len):
    return self._forward(x_BTD, None, True)

  def step(self, x_BD, cache, pos):
    q, k, v = self._project(x_BD)
    o, state = gla_step(q, k, v, None, cache["state"], scale=self.kd ** -0.5)
    return self._out(o), {"state": state}

  def init_cache(self, batch_size, max_len):
    # The whole decode state: one float32 [K, V] sum per head, whatever the context length.
    return {"state": jnp.zeros((batch_size, self.h, self.kd, self.vd), jnp.float32)}
