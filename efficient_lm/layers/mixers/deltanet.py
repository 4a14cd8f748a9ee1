"""DeltaNet and Gated DeltaNet mixers (FLA's layers; models.md, "DeltaNet layer").

    q, k, v = silu(conv4(W_q h)), silu(conv4(W_k h)), silu(conv4(W_v h))   (convs without bias)
    q, k = l2norm (x / sqrt(sum x^2 + 1e-6));  beta = sigmoid(W_b h) (x2 with negative eigenvalues)
    gated: g = -exp(A_log) * softplus(W_a h + dt_bias)   (one log decay per head)
    o = delta_rule(q, k, v, beta, g, scale=K^-0.5)
    o = rmsnorm(o) (one [V] weight shared by heads), or rmsnorm(o) * silu(W_g h) with the output gate
    y = W_o o
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.layers.conv import apply_convs, qkv_conv_init, qkv_convs
from efficient_lm.layers.core import Dense, mamba_dt_bias_init, normal, param
from efficient_lm.layers.norms import RMSNorm, l2norm_fla
from pallas_kernels import delta_rule, delta_rule_step


def a_log_init(key, shape, dtype):
  """A ~ U(0, 16), A_log = log A."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.0, 16.0)).astype(dtype)


class DeltaNet(nnx.Module):

  def __init__(self, cfg, *, gated: bool, rngs: nnx.Rngs):
    d, h, kd = cfg.d_model, cfg.n_heads, cfg.attn_head_dim
    vd = int(kd * cfg.expand_v)
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    std = normal(cfg.init_std)
    self.q_proj = Dense(d, h * kd, ("embed", "heads"), kernel_init=std, **kw)
    self.k_proj = Dense(d, h * kd, ("embed", "heads"), kernel_init=std, **kw)
    self.v_proj = Dense(d, h * vd, ("embed", "heads"), kernel_init=std, **kw)
    self.b_proj = Dense(d, h, ("embed", None), kernel_init=std, **kw)
    self.convs = (qkv_convs(cfg.conv_size, h * kd, h * vd, weight_init=qkv_conv_init(cfg), **kw)
                  if cfg.short_conv(True) else None)
    if gated:
      self.a_proj = Dense(d, h, ("embed", None), kernel_init=std, **kw)
      self.A_log = param(rngs, a_log_init, (h,), (None,), jnp.float32)
      self.dt_bias = param(rngs, mamba_dt_bias_init(), (h,), (None,), jnp.float32)
    self.g_proj = Dense(d, h * vd, ("embed", "heads"), kernel_init=std, **kw) if cfg.use_output_gate else None
    self.o_norm = RMSNorm(vd, cfg.norm_eps, rngs=rngs, dtype=jnp.float32, param_dtype=jnp.float32)
    self.o_proj = Dense(h * vd, d, ("heads", "embed"), kernel_init=std, **kw)
    self.gated, self.neg_eig = gated, cfg.allow_neg_eigval
    self.h, self.kd, self.vd = h, kd, vd
    self.impl, self.chunk_size = cfg.impl, cfg.chunk_size
    self.dtype = jnp.dtype(cfg.dtype)

  def _heads(self, q, k, v, h_):
    """Per-head q, k (normalised), v, beta, g from the post-conv projections and the input h_."""
    lead = q.shape[:-1]
    q = l2norm_fla(q.reshape(*lead, self.h, self.kd)).astype(self.dtype)
    k = l2norm_fla(k.reshape(*lead, self.h, self.kd)).astype(self.dtype)
    v = v.reshape(*lead, self.h, self.vd)
    beta = jax.nn.sigmoid(self.b_proj(h_).astype(jnp.float32)) * (2.0 if self.neg_eig else 1.0)
    g = None
    if self.gated:
      g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(self.a_proj(h_).astype(jnp.float32) + self.dt_bias[...])
    return q, k, v, beta, g

  def _out(self, o, h_):
    o = self.o_norm(o.astype(jnp.float32))
    if self.g_proj is not None:
      o = o * jax.nn.silu(self.g_proj(h_).astype(jnp.float32)).reshape(o.shape)
    return self.o_proj(o.reshape(*o.shape[:-2], -1))

  def _qkv(self, h_, seg_BT=None, conv_caches=None):
    """q, k, v after the short convs (or SiLU alone without them) and the convs' new caches."""
    qkv = (self.q_proj(h_), self.k_proj(h_), self.v_proj(h_))
    if self.convs is None:
      return [jax.nn.silu(x) for x in qkv], None
    return apply_convs(self.convs, qkv, seg_BT, conv_caches)

  def _forward(self, h_BTD, seg_BT, want_state):
    (q, k, v), conv_caches = self._qkv(h_BTD, seg_BT)
    q, k, v, beta, g = self._heads(q, k, v, h_BTD)
    o, state = delta_rule(q, k, v, beta, g=g, scale=self.kd ** -0.5, segment_ids=seg_BT,
                          return_final_state=want_state, impl=self.impl, chunk_size=self.chunk_size)
    return self._out(o, h_BTD), {"conv": conv_caches, "state": state}

  def __call__(self, h_BTD, seg_BT, pos_BT):
    return self._forward(h_BTD, seg_BT, False)[0]

  def prefill(self, h_BTD, pos_BT, max_len):
    return self._forward(h_BTD, None, True)

  def step(self, h_BD, cache, pos):
    (q, k, v), conv_caches = self._qkv(h_BD, conv_caches=cache["conv"])
    q, k, v, beta, g = self._heads(q, k, v, h_BD)
    o, state = delta_rule_step(q, k, v, beta, cache["state"], g=g, scale=self.kd ** -0.5)
    return self._out(o, h_BD), {"conv": conv_caches, "state": state}

  def init_cache(self, batch_size, max_len):
    convs = None if self.convs is None else [c.init_cache(batch_size) for c in self.convs]
    return {"conv": convs, "state": jnp.zeros((batch_size, self.h, self.kd, self.vd), jnp.float32)}
