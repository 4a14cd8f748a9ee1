"""Pallas kernel (GPU, Mosaic GPU lowering: TMA and wgmma on Hopper) for the whole chunked GLA
forward with a scalar per-token log decay or none: the first fused Mosaic GPU kernel (issue 12),
with the contract of `chunk_kernels_triton.forward` for beta None and g [B, T, H] or None.

One warpgroup per (batch*head, 64-wide value block) walks the chunks. Per chunk, TMA copies the
chunk's q, k, v tiles straight out of their [B, T, H, *] layout (and the chunk's cumulative log
decay) into 128-byte-swizzled shared memory, two buffer slots where they fit (`_walk` of
`state_pass_mosaic_gpu`: chunk n+1's copies overlap chunk n's work). The float32 state stays in
registers (WGMMA layout); its 16-bit copy in shared memory is the B operand of Q S and, with
`store_states`, goes to HBM as the state entering the chunk. With b the chunk's inclusive
cumulative log decay (computed in XLA), e_i = exp(b_i), d_i = exp(b_C - b_i), lambda = exp(b_C),
Gamma_ij = exp(b_i - b_j) for j <= i, else 0 (all ones / the causal mask without a decay):

    P = scale (Q K^T) * Gamma                  (wgmma, then Gamma in registers; P in 16 bits)
    O = scale e * (Q S) + P V                  (P V: wgmma with P as the register A operand)
    S' = lambda S + K^T (d * V)                (d * V rounded to 16 bits, as the Triton kernel does)

wgmma needs C, K and V to be multiples of 64 and 16-bit operands (`state_pass_mosaic_gpu.supports`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.state_pass_mosaic_gpu import (
    BLOCK_V, _call, _fetch_one, _matmul, _scratch, _stage_out, _walk, plgpu, supports)


class _Geometry(NamedTuple):
  """One chunk's decay factors in WGMMA layouts: gamma [C, C]; e, d [C] (row vectors) and lam (a
  scalar), None without a decay (all ones)."""
  gamma: jax.Array
  e: jax.Array | None = None
  d: jax.Array | None = None
  lam: jax.Array | None = None


def _causal_CC(c):
  rows = plgpu.broadcasted_iota(jnp.int32, (c, c), 0, layout=plgpu.Layout.WGMMA)
  cols = plgpu.broadcasted_iota(jnp.int32, (c, c), 1, layout=plgpu.Layout.WGMMA)
  return rows >= cols


def _geometry(b_views, c):
  """The factors of a chunk from two shared-memory copies of its inclusive cumulative log decay
  ([C] float32 each), or of an undecayed chunk (b_views None). Two copies: Mosaic GPU's layout
  inference (jax 0.12) finds no solution when one buffer is loaded both as rows and as columns."""
  causal_CC = _causal_CC(c)
  if b_views is None:
    return _Geometry(jnp.where(causal_CC, 1.0, 0.0))
  row_C = plgpu.load(b_views[0], layout=plgpu.Layout.WGMMA.reduce(1))   # b_i, constant along rows
  col_C = plgpu.load(b_views[1], layout=plgpu.Layout.WGMMA.reduce(0))   # b_j, constant along columns
  last = b_views[0][c - 1]
  # Masking the exponent, not the product: exp(b_i - b_j) above the diagonal overflows under a
  # strong decay (b_i - b_j > 0 there), and inf * 0 is NaN.
  diff_CC = lax.broadcast_in_dim(row_C, (c, c), [0]) - lax.broadcast_in_dim(col_C, (c, c), [1])
  gamma_CC = jnp.exp(jnp.where(causal_CC, diff_CC, -jnp.inf))
  return _Geometry(gamma_CC, jnp.exp(row_C), jnp.exp(last - row_C), jnp.exp(last))


def _rows(vec_C, x_CV):
  """diag(vec) x for a row vector and a WGMMA-layout array."""
  return lax.broadcast_in_dim(vec_C, x_CV.shape, [0]) * x_CV


def _accumulate(init, *operand_pairs):
  """init + sum of a @ b over the (a, b) operand pairs (a in shared memory or a 16-bit WGMMA-layout
  register array, b in shared memory), float32."""
  def body(acc):
    for a, b in operand_pairs:
      plgpu.wgmma(acc, a, b)
  return pl.run_state(body)(plgpu.ACC.init(init))


def _chunk_output(q_CK, k_CK, v_CV, s_KV, geo, scale):
  """O of one chunk (float32) from shared-memory tiles; s_KV is the entering state's 16-bit copy."""
  c = q_CK.shape[0]
  qk_CC = _matmul((c, c), (q_CK, k_CK.transpose((1, 0))))
  p_CC = (scale * qk_CC * geo.gamma).astype(q_CK.dtype)
  qs_CV = _matmul((c, v_CV.shape[1]), (q_CK, s_KV))
  scaled_CV = scale * qs_CV if geo.e is None else _rows(scale * geo.e, qs_CV)
  return _accumulate(scaled_CV, (p_CC, v_CV))


def _next_state(s_KV, k_CK, v_CV, dv_CV, geo):
  """lambda S + K^T (d * V); dv_CV: shared memory for d * V in 16 bits (None without a decay)."""
  x_CV = v_CV
  if geo.d is not None:
    dv_CV[...] = _rows(geo.d, plgpu.load(v_CV, layout=plgpu.Layout.WGMMA).astype(jnp.float32)).astype(dv_CV.dtype)
    plgpu.commit_smem()
    x_CV = dv_CV
  decayed_KV = s_KV if geo.lam is None else geo.lam * s_KV
  return _accumulate(decayed_KV, (k_CK.transpose((1, 0)), x_CV))


def _forward_body(*refs, heads, scale, has_g, store_states):
  it = iter(refs)
  q, k, v = next(it), next(it), next(it)
  cum_g = next(it) if has_g else None
  s0, o, s_final = next(it), next(it), next(it)
  states = next(it) if store_states else None
  q_buf, k_buf, v_buf = next(it), next(it), next(it)
  b_bufs = [next(it), next(it)] if has_g else []
  s_s, o_s, f32_s = next(it), next(it), next(it)
  dv_s = next(it) if has_g else None
  bars = next(it)
  bh = lax.axis_index("bh")
  bi, hi = lax.div(bh, heads), lax.rem(bh, heads)
  cols = pl.ds(lax.axis_index("v") * BLOCK_V, BLOCK_V)
  c = q_buf.shape[1]
  tok = lambda n: pl.ds(n * c, c)
  sources = [lambda n: q.at[bi, tok(n), hi], lambda n: k.at[bi, tok(n), hi], lambda n: v.at[bi, tok(n), hi, cols]]
  if has_g:
    sources += [lambda n: cum_g.at[bh, n]] * 2
  _fetch_one(s0.at[bh, :, cols], f32_s, bars.at[bars.shape[0] - 1])
  s_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def body(n, views, s):
    q_v, k_v, v_v = views[:3]
    geo = _geometry(views[3:] if has_g else None, c)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's stores out of s_s and o_s
    s_s[...] = s.astype(s_s.dtype)
    plgpu.commit_smem()
    if store_states:
      plgpu.copy_smem_to_gmem(s_s, states.at[bh, n, :, cols])
    o_s[...] = _chunk_output(q_v, k_v, v_v, s_s, geo, scale).astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o.at[bi, tok(n), hi, cols])
    return _next_state(s, k_v, v_v, dv_s, geo)

  s = _walk(q.shape[1] // c, sources, [q_buf, k_buf, v_buf, *b_bufs], bars, body, s_init, reverse=False)
  _stage_out(s, f32_s, s_final.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _scratch_types(c, kd, mm, out_dtype, has_g):
  """Shared memory (`state_pass_mosaic_gpu._scratch`): per chunk the q, k, v (and two
  cumulative-decay) buffers; the state's 16-bit copy, the output tile, a float32 staging buffer
  for the initial and final states (and d * V); one more TMA barrier for the initial state."""
  per_chunk = [((c, kd), mm, True), ((c, kd), mm, True), ((c, BLOCK_V), mm, True)]
  per_chunk += [((c,), jnp.float32, False)] * 2 if has_g else []
  fixed = [((kd, BLOCK_V), mm, True), ((c, BLOCK_V), out_dtype, True), ((kd, BLOCK_V), jnp.float32, False)]
  fixed += [((c, BLOCK_V), mm, True)] if has_g else []
  return _scratch(per_chunk, fixed)


def _check(q, v, g, chunk):
  why = supports(q.dtype, chunk, q.shape[-1], v.shape[-1])
  if why is None and q.shape[1] % chunk:
    why = f"T must be a multiple of the chunk (callers pad), got T={q.shape[1]}, chunk {chunk}"
  if why is None and g is not None and g.ndim != 3:
    why = f"only a scalar [B, T, H] decay or none, got g of shape {g.shape}"
  if why:
    raise ValueError(f"Mosaic GPU fused GLA forward: {why}")


def chunk_cumsum_BHNC(g, chunk):
  """[B, T, H] log decay -> its float32 inclusive cumulative sum inside each chunk, [B*H, N, C]."""
  b, t, h = g.shape
  g_BHNC = g.astype(jnp.float32).transpose(0, 2, 1).reshape(b, h, t // chunk, chunk)
  return jnp.cumsum(g_BHNC, axis=-1).reshape(b * h, t // chunk, chunk)


def forward(q, k, v, g, s0, *, scale, chunk, store_states, interpret=False):
  """O [B, T, H, V] in v's dtype, the final state [B*H, K, V] float32 and, if `store_states`, the
  state entering every chunk [B*H, N, K, V] in q's dtype (else None). q, k [B, T, H, K] and v
  [B, T, H, V] 16-bit with T a multiple of `chunk`; g [B, T, H] float32 log decay or None;
  s0 [B*H, K, V] float32."""
  _check(q, v, g, chunk)
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n = t // chunk
  has_g = g is not None
  out_type = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32)]
  if store_states:
    out_type.append(jax.ShapeDtypeStruct((b * h, n, kd, vd), q.dtype))
  inputs = [q, k, v] + ([chunk_cumsum_BHNC(g, chunk)] if has_g else []) + [s0]
  body = functools.partial(_forward_body, heads=h, scale=scale, has_g=has_g, store_states=store_states)
  res = _call(body, tuple(out_type), _scratch_types(chunk, kd, q.dtype, v.dtype, has_g), (b * h, vd // BLOCK_V),
              interpret, *inputs)
  return res[0], res[1], res[2] if store_states else None
