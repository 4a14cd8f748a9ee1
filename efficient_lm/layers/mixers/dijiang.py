"""DiJiang attention: frequency-domain kernelised linear attention in a GPT-NeoX host
(models.md, "DiJiang attention").

Per head of size p, with q, k after partial RoPE:
    phi(x) = softmax((x @ C) * w)        over the p features
    C[k, n] = sqrt((2 - delta_k0) / p) cos(pi k (2n + 1) / (2p))   (orthonormal DCT-II rows)
    w_i = Phi^{-1}(u_i), u_i ~ U(0, 1)   (standard normal quantiles; infinities -> 0)
C and w are fixed per layer (a `Buffer`, never trained) and shared by all heads.
    o_t = sum_{s<=t} gamma_h^{t-s} (phi(q_t) . phi(k_s)) v_s,
    gamma_h = 1 - exp(linspace(log 1/32, log 1/512, H))[h]
i.e. scalar-decay GLA with g = log gamma_h, scale 1, no normaliser.
Deviation (ours): the official code materialises a T x T matrix with TRAINED per-position
factors D1, D2 (initialised gamma^t and gamma^-t); we use the exact recurrence with fixed gamma,
or (`dijiang_learn_decay`) a learned per-head decay gamma = sigmoid(logit), so any T works and
decoding is exact.
Output: GroupNorm(num_groups=p) over the merged d channels (contiguous groups of H channels,
which may straddle heads), affine, eps 1e-5; then y = W_dense(silu(h W_G) * o).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_lm.layers.core import Buffer, Dense, init, normal, param, xavier_uniform
from efficient_lm.layers.rope import apply_rope
from pallas_kernels import gla, gla_step


def dct_matrix(p: int) -> np.ndarray:
  """C[k, n] = sqrt((2 - delta_k0) / p) cos(pi k (2n + 1) / (2p)) = scipy dct(eye(p), axis=0, norm='ortho')."""
  k, n = np.arange(p)[:, None], np.arange(p)[None, :]
  c = np.sqrt((2.0 - (k == 0)) / p) * np.cos(np.pi * k * (2 * n + 1) / (2 * p))
  return c.astype(np.float32)


def gaussian_quantiles(key, p: int):
  w = jax.scipy.stats.norm.ppf(jax.random.uniform(key, (p,), jnp.float32))
  return jnp.where(jnp.isfinite(w), w, 0.0)


def feature_map(x_BTHP, dct_PP, w_P):
  """phi(x) = softmax((x @ C) * w) over the last axis, float32."""
  return jax.nn.softmax(jnp.einsum("...k,kn->...n", x_BTHP.astype(jnp.float32), dct_PP) * w_P, axis=-1)


def head_log_decays(n_heads: int):
  """log gamma_h with gamma_h = 1 - exp(linspace(log(1/32), log(1/512), H))."""
  gamma = 1.0 - np.exp(np.linspace(math.log(1 / 32), math.log(1 / 512), n_heads))
  return jnp.asarray(np.log(gamma), jnp.float32)


GROUP_NORM_EPS = 1e-5


def group_norm(x_BTD, groups: int, scale, bias, eps: float):
  """GroupNorm per token over `groups` contiguous channel blocks, float32."""
  lead, d = x_BTD.shape[:-1], x_BTD.shape[-1]
  x = x_BTD.astype(jnp.float32).reshape(*lead, groups, d // groups)
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  x = ((x - mean) * jax.lax.rsqrt(var + eps)).reshape(*lead, d)
  return x * scale + bias


class DiJiang(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, h, p = cfg.d_model, cfg.n_heads, cfg.attn_head_dim
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.qkv = Dense(d, 3 * h * p, ("embed", "heads"), kernel_init=normal(cfg.init_std), use_bias=True, **kw)
    self.dct = Buffer(jnp.asarray(dct_matrix(p)))
    self.w = Buffer(gaussian_quantiles(rngs.params(), p))
    if cfg.dijiang_learn_decay:
      gamma = jnp.exp(head_log_decays(h))
      self.decay_logit = param(rngs, lambda *_: jnp.log(gamma) - jnp.log1p(-gamma), (h,), (None,), jnp.float32)
    self.learn_decay = cfg.dijiang_learn_decay
    self.norm_scale = param(rngs, init.ones, (h * p,), (None,), jnp.float32)
    self.norm_bias = param(rngs, init.zeros, (h * p,), (None,), jnp.float32)
    self.gate = Dense(d, h * p, ("embed", "heads"), kernel_init=xavier_uniform(2 ** -2.5), **kw)
    self.dense = Dense(h * p, d, ("heads", "embed"), kernel_init=normal(cfg.init_std), use_bias=True, **kw)
    self.h, self.p = h, p
    self.rope_base, self.rot_dim = cfg.rope_base, int(p * cfg.rope_fraction)
    self.impl, self.chunk_size = cfg.impl, cfg.chunk_size
    self.dtype = jnp.dtype(cfg.dtype)

  def _log_decay(self):
    return jax.nn.log_sigmoid(self.decay_logit[...]) if self.learn_decay else head_log_decays(self.h)

  def _features(self, x_BTD, pos_BT):
    """phi(q), phi(k) in the compute dtype and v, from the NeoX fused qkv laid out [H, 3, p]."""
    b, t, _ = x_BTD.shape
    q, k, v = jnp.moveaxis(self.qkv(x_BTD).reshape(b, t, self.h, 3, self.p), 3, 0)
    q = apply_rope(q, pos_BT, self.rope_base, self.rot_dim)
    k = apply_rope(k, pos_BT, self.rope_base, self.rot_dim)
    phi = lambda x: feature_map(x, self.dct[...], self.w[...]).astype(self.dtype)
    return phi(q), phi(k), v

  def _out(self, o_BTHP, x_BTD):
    o = o_BTHP.reshape(*o_BTHP.shape[:-2], self.h * self.p)
    o = group_norm(o, self.p, self.norm_scale[...], self.norm_bias[...], GROUP_NORM_EPS)
    return self.dense(jax.nn.silu(self.gate(x_BTD)) * o.astype(self.dtype))

  def _forward(self, x_BTD, seg_BT, pos_BT, want_state):
    q, k, v = self._features(x_BTD, pos_BT)
    g = jnp.broadcast_to(self._log_decay(), q.shape[:3])
    o, state = gla(q, k, v, g, scale=1.0, segment_ids=seg_BT, return_final_state=want_state, impl=self.impl,
                   chunk_size=self.chunk_size)
    return self._out(o, x_BTD), {"state": state}

  def __call__(self, x_BTD, seg_BT, pos_BT):
    return self._forward(x_BTD, seg_BT, pos_BT, False)[0]

  def prefill(self, x_BTD, pos_BT, max_len):
    return self._forward(x_BTD, None, pos_BT, True)

  def step(self, x_BD, cache, pos):
    b = x_BD.shape[0]
    q, k, v = self._features(x_BD[:, None], jnp.full((b, 1), pos, jnp.int32))
    g = jnp.broadcast_to(self._log_decay(), (b, self.h))
    o, state = gla_step(q[:, 0], k[:, 0], v[:, 0], g, cache["state"], scale=1.0)
    return self._out(o[:, None], x_BD[:, None])[:, 0], {"state": state}

  def init_cache(self, batch_size, max_len):
    return {"state": jnp.zeros((batch_size, self.h, self.p, self.p), jnp.float32)}
