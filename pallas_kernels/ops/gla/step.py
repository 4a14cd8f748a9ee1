"""One-token GLA step: the decode form, and the body of the scan reference."""
from __future__ import annotations

import jax.numpy as jnp


def gla_step_f32(q_BHK, k_BHK, v_BHV, g, s_BHKV, scale: float):
  """S = diag(exp(g)) S + k^T v; o = scale * q S. All float32; g None, [B,H] or [B,H,K]."""
  if g is not None:
    decay = jnp.exp(g)
    s_BHKV = s_BHKV * (decay[..., None, None] if decay.ndim == 2 else decay[..., None])
  s_BHKV = s_BHKV + k_BHK[..., :, None] * v_BHV[..., None, :]
  o_BHV = scale * jnp.einsum("bhk,bhkv->bhv", q_BHK, s_BHKV)
  return o_BHV, s_BHKV
