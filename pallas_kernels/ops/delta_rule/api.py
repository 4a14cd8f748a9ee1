"""Public delta-rule ops: `delta_rule` over a sequence and `delta_rule_step` for one token."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _checks
from pallas_kernels.common.chunking import segment_runs
from pallas_kernels.ops.delta_rule.chunk import delta_rule_chunk
from pallas_kernels.ops.delta_rule.pallas import delta_rule_pallas
from pallas_kernels.ops.delta_rule.scan import delta_rule_scan
from pallas_kernels.ops.delta_rule.step import delta_rule_step_f32
from pallas_kernels.dispatch import resolve_impl

_FORMS = {"scan": delta_rule_scan, "chunk": delta_rule_chunk, "pallas": delta_rule_pallas}


def delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None, return_final_state=False,
               segment_ids=None, impl="auto", chunk_size=64):
  """(Gated) delta rule: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
  o_t = scale S_t^T q_t.

  Args:
    q, k: [B, T, H, K] (k L2-normalised by the caller); v: [B, T, H, V].
    beta: [B, T, H], in (0, 1) (or (0, 2) with negative eigenvalues).
    g: None (DeltaNet) or [B, T, H] log decay <= 0 (Gated DeltaNet).
    scale, initial_state, segment_ids, impl, chunk_size: as for `gla`.
  Returns:
    (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None).
  """
  b, t, h, kd, vd = _checks.check_qkv(q, k, v, per_token=True)
  _checks.check_head_scalar("beta", beta, (b, t, h))
  _checks.check_head_scalar("g", g, (b, t, h), optional=True)
  _checks.check_state("initial_state", initial_state, b, h, kd, vd, optional=True)
  _checks.check_segment_ids(segment_ids, b, t)
  segment_ids = None if segment_ids is None else segment_runs(segment_ids)
  _checks.check_chunk_size(chunk_size, 1)
  scale = _checks.resolve_scale(scale, kd)
  form = _FORMS[resolve_impl(impl, tuple(_FORMS), op="delta_rule" if g is None else "gated_delta_rule",
                             dtype=q.dtype, kd=kd, vd=vd, chunk_size=chunk_size)]
  s0 = _checks.resolve_initial_state(initial_state, b, h, kd, vd)
  extra = {} if form is delta_rule_scan else {"chunk_size": chunk_size}
  o, s_final = form(q, k, v, beta, g, scale=scale, s0=s0, segment_ids=segment_ids, **extra)
  return o, (s_final if return_final_state else None)


def delta_rule_step(q, k, v, beta, state, g=None, scale=None):
  """One decoding step. q, k: [B, H, K]; v: [B, H, V]; beta, g: [B, H]; state: [B, H, K, V].
  Returns (o [B, H, V] in v's dtype, new state float32)."""
  b, h, kd, vd = _checks.check_qkv(q, k, v, per_token=False)
  _checks.check_head_scalar("beta", beta, (b, h))
  _checks.check_head_scalar("g", g, (b, h), optional=True)
  _checks.check_state("state", state, b, h, kd, vd)
  scale = _checks.resolve_scale(scale, kd)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  o, state = delta_rule_step_f32(f32(q), f32(k), f32(v), f32(beta), f32(g), f32(state), scale)
  return o.astype(v.dtype), state
