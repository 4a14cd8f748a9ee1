"""One-token delta-rule step: the decode form, and the body of the scan reference."""
from __future__ import annotations

import jax.numpy as jnp


def delta_rule_step_f32(q_BHK, k_BHK, v_BHV, beta_BH, g_BH, s_BHKV, scale: float):
  """S = exp(g) (I - beta k k^T) S + beta k v^T; o = scale * S^T q. All float32."""
  if g_BH is not None:
    s_BHKV = s_BHKV * jnp.exp(g_BH)[..., None, None]
  err_BHV = v_BHV - jnp.einsum("bhk,bhkv->bhv", k_BHK, s_BHKV)
  s_BHKV = s_BHKV + beta_BH[..., None, None] * k_BHK[..., :, None] * err_BHV[..., None, :]
  o_BHV = scale * jnp.einsum("bhk,bhkv->bhv", q_BHK, s_BHKV)
  return o_BHV, s_BHKV
