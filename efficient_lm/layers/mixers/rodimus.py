"""Rodimus's DDTS mixer (models.md, "Rodimus block"): one GLA head with key dim m = mem_size
and value dim d_inner, data-dependent temperature-selected decay, a low-rank channel gate.

    x, z = split(W_fc h)                   x first
    x_c = silu(conv4(x) + b)
    q, k = split(W_in x_c);  k = k / max(||k||, eps)            (float32)
    u = sigmoid(W_up(W_low x) + b_up) * x                        (pre-conv x)
    s, t = split(W_g x_c + b_g)    (matmul in the compute dtype, bias and after in float32)
    sel = softplus(s); tau = sigmoid(t); i = sel ** tau; g = -sel * tau
    o = GLA(q, k * i, u, g, scale=m^-0.5) + w_res * x_c
    y = W_out(rmsnorm(o * silu(z)))
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.layers.conv import ShortConv, torch_conv_init
from efficient_lm.layers.core import Dense, init, normal, param, scaled, softplus_inverse, xavier_uniform
from efficient_lm.layers.norms import RMSNorm, l2norm_torch
from pallas_kernels import gla, gla_step

GATE_GAIN = 2 ** -2.5


def gate_bias_init(m: int):
  """b_g = [softplus^-1(dt) for s (dt = exp(U(log 1e-3, log 0.1)) clamped at 1e-4),
            logit(U(1/16, 0.9)) for t]."""
  def initializer(key, shape, dtype):
    k_s, k_t = jax.random.split(key)
    u = jax.random.uniform(k_s, (m,), jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
    tau = jax.random.uniform(k_t, (m,), jnp.float32, 1 / 16, 0.9)
    return jnp.concatenate([softplus_inverse(dt), jnp.log(tau) - jnp.log1p(-tau)]).astype(dtype)
  return initializer


class Rodimus(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, di, m, r = cfg.d_model, cfg.d_inner, cfg.mem_size, cfg.low_rank
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    gain = xavier_uniform(GATE_GAIN)
    out_scale = (cfg.out_proj_rescale * cfg.n_layers) ** -0.5 if cfg.out_proj_rescale else 1.0
    self.fc = Dense(d, 2 * di, ("embed", "mlp"), kernel_init=normal(cfg.init_std), **kw)
    self.conv = ShortConv(di, cfg.conv_size, "mlp", use_bias=True, activation=True,
                          weight_init=torch_conv_init(cfg.conv_size), **kw)
    self.in_proj = Dense(di, 2 * m, ("mlp", "state"), kernel_init=gain, **kw)
    self.low = Dense(di, r, ("mlp", None), kernel_init=gain, **kw)
    self.up = Dense(r, di, (None, "mlp"), kernel_init=gain, use_bias=True, **kw)
    self.gate = Dense(di, 2 * m, ("mlp", "state"), kernel_init=gain, **kw)
    self.gate_bias = param(rngs, gate_bias_init(m), (2 * m,), ("state",), jnp.float32)
    self.w_res = param(rngs, init.ones, (di,), ("mlp",), jnp.float32)
    self.norm = RMSNorm(di, cfg.norm_eps, **kw)
    self.out_proj = Dense(di, d, ("mlp", "embed"), kernel_init=scaled(normal(cfg.init_std), out_scale), **kw)
    self.m, self.d_inner, self.k_eps = m, di, cfg.rodimus_k_eps
    self.impl, self.chunk_size = cfg.impl, cfg.chunk_size
    self.dtype = jnp.dtype(cfg.dtype)

  def _gates(self, x, x_c):
    """q, k * i, u, g from the pre-conv x and post-conv x_c (any leading shape)."""
    q, k = jnp.split(self.in_proj(x_c), 2, axis=-1)
    k = l2norm_torch(k, self.k_eps)
    u = jax.nn.sigmoid(self.up(self.low(x))) * x
    s, t = jnp.split(self.gate(x_c).astype(jnp.float32) + self.gate_bias[...], 2, axis=-1)
    sel, tau = jax.nn.softplus(s), jax.nn.sigmoid(t)
    k_in = (k * jnp.power(sel, tau)).astype(self.dtype)   # input gate i = sel ** tau
    return q, k_in, u, -sel * tau

  def _out(self, o, x_c, z):
    o = o.astype(jnp.float32) + self.w_res[...] * x_c.astype(jnp.float32)
    return self.out_proj(self.norm(o * jax.nn.silu(z.astype(jnp.float32))))

  def _forward(self, h_BTD, seg_BT, want_state):
    x, z = jnp.split(self.fc(h_BTD), 2, axis=-1)
    x_c, conv_cache = self.conv(x, seg_BT)
    q, k, u, g = self._gates(x, x_c)
    o, state = gla(q[:, :, None], k[:, :, None], u[:, :, None], g[:, :, None], scale=self.m ** -0.5,
                   segment_ids=seg_BT, return_final_state=want_state, impl=self.impl,
                   chunk_size=self.chunk_size)
    return self._out(o[:, :, 0], x_c, z), {"conv": conv_cache, "state": state}

  def __call__(self, h_BTD, seg_BT, pos_BT):
    return self._forward(h_BTD, seg_BT, False)[0]

  def prefill(self, h_BTD, pos_BT, max_len):
    return self._forward(h_BTD, None, True)

  def step(self, h_BD, cache, pos):
    x, z = jnp.split(self.fc(h_BD), 2, axis=-1)
    x_c, conv_cache = self.conv.step(x, cache["conv"])
    q, k, u, g = self._gates(x, x_c)
    o, state = gla_step(q[:, None], k[:, None], u[:, None], g[:, None], cache["state"], scale=self.m ** -0.5)
    return self._out(o[:, 0], x_c, z), {"conv": conv_cache, "state": state}

  def init_cache(self, batch_size, max_len):
    return {"conv": self.conv.init_cache(batch_size),
            "state": jnp.zeros((batch_size, 1, self.m, self.d_inner), jnp.float32)}
