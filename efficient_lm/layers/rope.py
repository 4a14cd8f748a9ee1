"""Rotary embeddings (rotate-half, optionally on the first fraction of each head's dims) and
per-segment positions for packed documents."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_positions(seg_BT):
  """Position of each token inside its own segment (restarts at every id change)."""
  t = jnp.arange(seg_BT.shape[1], dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(seg_BT[:, :1], bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
  start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
  return t - start_index


def positions(seg_BT, batch: int, t: int):
  if seg_BT is None:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  return segment_positions(seg_BT)


def apply_rope(x_BTHK, pos_BT, base: float, rot_dim: int):
  """Rotate-half RoPE on x[..., :rot_dim] (float32 math, x's dtype out)."""
  inv_freq = base ** (-jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim)
  angles = pos_BT.astype(jnp.float32)[..., None] * inv_freq          # [B, T, rot/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None]     # [B, T, 1, rot]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None]
  x32 = x_BTHK.astype(jnp.float32)
  rot, rest = x32[..., :rot_dim], x32[..., rot_dim:]
  half = rot_dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], -1)
  out = jnp.concatenate([rot * cos + rotated * sin, rest], -1)
  return out.astype(x_BTHK.dtype)
