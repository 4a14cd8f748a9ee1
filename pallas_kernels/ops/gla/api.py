"""Public GLA ops: `gla` over a sequence and `gla_step` for one token."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _checks
from pallas_kernels.common.chunking import segment_runs
from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.ops.gla.chunk import SUB_CHUNK, gla_chunk
from pallas_kernels.ops.gla.pallas import gla_pallas
from pallas_kernels.ops.gla.scan import gla_scan
from pallas_kernels.ops.gla.step import gla_step_f32

_FORMS = {"scan": gla_scan, "chunk": gla_chunk, "pallas": gla_pallas}


def gla(q, k, v, g=None, *, scale=None, initial_state=None, return_final_state=False,
        segment_ids=None, impl="auto", chunk_size=64):
  """Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; one floating dtype.
    g: log decay (<= 0): None (plain linear attention), [B, T, H] (one per
      head) or [B, T, H, K] (per key dimension).
    scale: defaults to K ** -0.5.
    initial_state: [B, H, K, V], feeds the first segment.
    segment_ids: [B, T] ints; the state restarts wherever the id changes.
    impl: "auto" | "scan" | "chunk" | "pallas".
  Returns:
    (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None).
  """
  b, t, h, kd, vd = _checks.check_qkv(q, k, v, per_token=True)
  _checks.check_gla_gate(g, (b, t, h), kd)
  _checks.check_state("initial_state", initial_state, b, h, kd, vd, optional=True)
  _checks.check_segment_ids(segment_ids, b, t)
  segment_ids = None if segment_ids is None else segment_runs(segment_ids)
  _checks.check_chunk_size(chunk_size, SUB_CHUNK)
  scale = _checks.resolve_scale(scale, kd)
  form = resolve_impl(impl, tuple(_FORMS), op="gla_perdim" if g is not None and g.ndim == 4 else "gla",
                      dtype=q.dtype, kd=kd, vd=vd, chunk_size=chunk_size)
  s0 = _checks.resolve_initial_state(initial_state, b, h, kd, vd)
  extra = {} if form == "scan" else {"chunk_size": chunk_size}
  o, s_final = _FORMS[form](q, k, v, g, scale=scale, s0=s0, segment_ids=segment_ids, **extra)
  return o, (s_final if return_final_state else None)


def gla_step(q, k, v, g, state, scale=None):
  """One decoding step. q, k: [B, H, K]; v: [B, H, V]; g: None, [B, H] or [B, H, K];
  state: [B, H, K, V]. Returns (o [B, H, V] in v's dtype, new state float32)."""
  b, h, kd, vd = _checks.check_qkv(q, k, v, per_token=False)
  _checks.check_gla_gate(g, (b, h), kd)
  _checks.check_state("state", state, b, h, kd, vd)
  scale = _checks.resolve_scale(scale, kd)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  o, state = gla_step_f32(f32(q), f32(k), f32(v), f32(g), f32(state), scale)
  return o.astype(v.dtype), state
