"""Gated linear attention mixer (FLA's `GatedLinearAttention` defaults: expand_k 0.5, expand_v 1,
low-rank key gate, output gate fused with the per-head RMSNorm, no short conv; `use_short_conv=True`
adds FLA's optional convs).

    q, k, v = W_q h, W_k h, W_v h          (with short convs: silu(conv4(W_q h)), ... as in DeltaNet)
    g = logsigmoid(W_gk2 (W_gk1 h) + b) / 16          (per key dim)
    o = gla(q, k, v, g, scale=K^-0.5)
    y = W_o( rmsnorm(o) * silu(W_g h) )               (one [V] norm weight shared by heads)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.layers.conv import apply_convs, qkv_conv_init, qkv_convs
from efficient_lm.layers.core import Dense, normal
from efficient_lm.layers.norms import RMSNorm
from pallas_kernels import gla, gla_step


class GLA(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.n_heads
    key_dim, value_dim = int(d * cfg.expand_k), int(d * cfg.expand_v)
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    std = normal(cfg.init_std)
    self.q_proj = Dense(d, key_dim, ("embed", "heads"), kernel_init=std, **kw)
    self.k_proj = Dense(d, key_dim, ("embed", "heads"), kernel_init=std, **kw)
    self.v_proj = Dense(d, value_dim, ("embed", "heads"), kernel_init=std, **kw)
    self.g_proj = Dense(d, value_dim, ("embed", "heads"), kernel_init=std, **kw)
    self.gk_low = Dense(d, cfg.gate_low_rank, ("embed", None), kernel_init=std, **kw)
    self.gk_up = Dense(cfg.gate_low_rank, key_dim, (None, "heads"), kernel_init=std, use_bias=True, **kw)
    self.o_norm = RMSNorm(value_dim // h, cfg.norm_eps, rngs=rngs, dtype=jnp.float32, param_dtype=jnp.float32)
    self.o_proj = Dense(value_dim, d, ("heads", "embed"), kernel_init=std, **kw)
    self.convs = (qkv_convs(cfg.conv_size, key_dim, value_dim, weight_init=qkv_conv_init(cfg), **kw)
                  if cfg.short_conv(False) else None)
    self.h, self.kd, self.vd = h, key_dim // h, value_dim // h
    self.normalizer = cfg.gate_logit_normalizer
    self.impl, self.chunk_size = cfg.impl, cfg.chunk_size

  def _project(self, x, seg=None, conv_caches=None):
    """Per-head q, k, v, g and the convs' new caches; conv_caches: the decode caches (one token)."""
    lead = x.shape[:-1]
    qkv = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
    if self.convs is not None:
      qkv, conv_caches = apply_convs(self.convs, qkv, seg, conv_caches)
    q, k, v = (y.reshape(*lead, self.h, -1) for y in qkv)
    g = jax.nn.log_sigmoid(self.gk_up(self.gk_low(x)).astype(jnp.float32)) / self.normalizer
    return q, k, v, g.reshape(*lead, self.h, self.kd), conv_caches

  def _out(self, o, x):
    o = self.o_norm(o.astype(jnp.float32))
    o = o * jax.nn.silu(self.g_proj(x).astype(jnp.float32)).reshape(o.shape)
    return self.o_proj(o.reshape(*o.shape[:-2], -1))

  def _forward(self, x_BTD, seg_BT, want_state):
    q, k, v, g, conv_caches = self._project(x_BTD, seg_BT)
    o, state = gla(q, k, v, g, scale=self.kd ** -0.5, segment_ids=seg_BT, return_final_state=want_state,
                   impl=self.impl, chunk_size=self.chunk_size)
    return self._out(o, x_BTD), {"conv": conv_caches, "state": state}

  def __call__(self, x_BTD, seg_BT, pos_BT):
    return self._forward(x_BTD, seg_BT, False)[0]

  def prefill(self, x_BTD, pos_BT, max_len):
    return self._forward(x_BTD, None, True)

  def step(self, x_BD, cache, pos):
    q, k, v, g, conv_caches = self._project(x_BD, conv_caches=cache["conv"])
    o, state = gla_step(q, k, v, g, cache["state"], scale=self.kd ** -0.5)
    return self._out(o, x_BD), {"conv": conv_caches, "state": state}

  def init_cache(self, batch_size, max_len):
    convs = None if self.convs is None else [c.init_cache(batch_size) for c in self.convs]
    return {"conv": convs, "state": jnp.zeros((batch_size, self.h, self.kd, self.vd), jnp.float32)}
