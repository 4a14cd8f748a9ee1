"""The (gated) delta rule as a per-token `lax.scan` in float32: the ground truth.

Autodiff through it stores one state per token, so it is a reference, not a training path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common.chunking import continues_BT
from pallas_kernels.ops.delta_rule.step import delta_rule_step_f32


def delta_rule_scan(q, k, v, beta, g, *, scale, s0, segment_ids):
  b, t, h, _ = q.shape
  f32 = lambda x: None if x is None else jnp.moveaxis(x.astype(jnp.float32), 1, 0)
  keep_TB = jnp.moveaxis(continues_BT(segment_ids, b, t), 1, 0)

  def step(s, xs):
    q_t, k_t, v_t, beta_t, g_t, keep_t = xs
    s = s * keep_t[:, None, None, None]
    o_t, s = delta_rule_step_f32(q_t, k_t, v_t, beta_t, g_t, s, scale)
    return s, o_t

  s_final, o_TBHV = jax.lax.scan(step, s0, (f32(q), f32(k), f32(v), f32(beta), f32(g), keep_TB))
  return jnp.moveaxis(o_TBHV, 0, 1).astype(v.dtype), s_final
