"""Argument validation: every user error becomes a ValueError naming the argument and its shape."""
from __future__ import annotations

import jax.numpy as jnp


def _shape(x):
  return tuple(x.shape)


def _fail(name, x, expected):
  raise ValueError(f"{name}: expected {expected}, got shape {_shape(x)} dtype {x.dtype}")


def _floating(name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: expected a floating dtype, got {x.dtype} (shape {_shape(x)})")


def _exact(name, x, shape, legend):
  if _shape(x) != tuple(shape):
    _fail(name, x, f"shape {legend} = {tuple(shape)}")


def check_qkv(q, k, v, *, per_token: bool):
  """Checks q, k, v and returns (B, T, H, K, V) (or (B, H, K, V) for one-token steps)."""
  rank, legend_k, legend_v = (4, "[B, T, H, K]", "[B, T, H, V]") if per_token else (3, "[B, H, K]", "[B, H, V]")
  for name, x, legend in (("q", q, legend_k), ("k", k, legend_k), ("v", v, legend_v)):
    if x.ndim != rank:
      _fail(name, x, f"rank {rank} {legend}")
    _floating(name, x)
  if _shape(k) != _shape(q):
    raise ValueError(f"k: expected the shape of q {_shape(q)} {legend_k}, got {_shape(k)}")
  if _shape(v)[:-1] != _shape(q)[:-1]:
    raise ValueError(f"v: expected leading dims {_shape(q)[:-1]} of q ({legend_v}), got {_shape(v)}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if per_token and q.shape[1] < 1:
    raise ValueError(f"q: expected T >= 1, got shape {_shape(q)}")
  return (*q.shape, v.shape[-1])


def check_gla_gate(g, lead, kd):
  """g of GLA: None, one scalar per head `lead`, or per key dimension `lead + (K,)`."""
  if g is None:
    return
  _floating("g", g)
  if _shape(g) not in (tuple(lead), (*lead, kd)):
    _fail("g", g, f"None, shape {tuple(lead)} (scalar decay) or {(*lead, kd)} (per-dimension decay)")


def check_head_scalar(name, x, lead, optional=False):
  if x is None and optional:
    return
  if x is None:
    raise ValueError(f"{name}: expected an array of shape {tuple(lead)}, got None")
  _floating(name, x)
  _exact(name, x, lead, "one value per token and head" if len(lead) == 3 else "one value per head")


def check_state(name, s, b, h, kd, vd, optional=False):
  if s is None and optional:
    return
  if s is None:
    raise ValueError(f"{name}: expected a state of shape {(b, h, kd, vd)} [B, H, K, V], got None")
  _floating(name, s)
  _exact(name, s, (b, h, kd, vd), "[B, H, K, V]")


def check_segment_ids(segment_ids, b, t):
  if segment_ids is None:
    return
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")
  _exact("segment_ids", segment_ids, (b, t), "[B, T]")


def check_chunk_size(chunk_size, sub_chunk):
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
  if chunk_size > sub_chunk and chunk_size % sub_chunk:
    raise ValueError(f"chunk_size: expected <= {sub_chunk} or a multiple of {sub_chunk}, got {chunk_size}")


def resolve_scale(scale, kd):
  if scale is None:
    return kd ** -0.5
  try:
    return float(scale)
  except TypeError:
    raise ValueError(f"scale: expected a Python float or None, got {type(scale).__name__}") from None


def resolve_initial_state(initial_state, b, h, kd, vd):
  """The float32 state entering the sequence: zeros when none is given."""
  if initial_state is None:
    return jnp.zeros((b, h, kd, vd), jnp.float32)
  return initial_state.astype(jnp.float32)
