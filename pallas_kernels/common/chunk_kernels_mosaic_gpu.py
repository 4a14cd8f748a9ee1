"""Pallas kernels (GPU, Mosaic GPU lowering: TMA and wgmma on Hopper) for the whole chunked GLA
forward and backward with a scalar per-token log decay or none (issue 12): `forward`, with the
contract of `chunk_kernels_triton.forward` for beta None and g [B, T, H] or None, `backward`
(`state_grads`, then `chunk_grads`) and `fused_gla`, the two under jax.custom_vjp.

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

The backward (hand-derived, checked against `jax.vjp` of the float32 scan), with H = dL/dS':

  `state_grads`: one warpgroup per (batch*head, 64-wide value block) walks the chunks in reverse
  with H in registers (float32), storing H of every chunk in 16 bits for `chunk_grads`:
    dV = P^T dO + d * (K H)                    (P^T = scale (K Q^T) * Gamma^T, a register A operand)
    dS = lambda H + scale (e * Q)^T dO         (the H of the chunk before; e * dO in 16 bits)
  `chunk_grads`: one warpgroup per (batch*head, chunk, 64-wide key block), summing over value
  blocks dP = dO V^T, dO S^T and V H^T (S: the state entering the chunk, `store_states`):
    dQ = scale (dP * Gamma) K + scale e * (dO S^T)
    dK = scale (dP * Gamma)^T Q + d * (V H^T)
    db = rowsum(Dg) - colsum(Dg) + scale e * rowsum((dO S^T) * Q) - d * rowsum((V H^T) * K)
         + [i = C] (sum_i d_i rowsum((V H^T) * K)_i + lambda <H, S>),   Dg = dP * P
  and dg is the in-chunk reverse cumulative sum of db (XLA, with the key blocks' shares).

Segment ids (packed sequences) enter through the factors only, as in `chunk_kernels_triton`: with
r_i the number of segment starts from the chunk's first token up to token i (`chunk_segments_BNC`;
r = 0: the segment of the state entering the chunk), Gamma is kept where r_i = r_j, e where r_i = 0,
d where r_i = r_C and lambda if r_C = 0 (`chunking.chunk_masks`'s masks); every formula above, the
db terms included, then holds as written (a zeroed factor's terms contribute nothing).

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
    BLOCK_V, _call, _fetch_one, _matmul, _stage_out, _walk, plgpu, scratch_within, supports)

BLOCK_K = 64   # key columns per program of the gradient kernels (and per step of the per-dim GLA scores)


class _Geometry(NamedTuple):
  """One chunk's decay factors in WGMMA layouts: gamma [C, C]; e, d [C] (row vectors) and lam (a
  scalar), None without a decay (all ones)."""
  gamma: jax.Array
  e: jax.Array | None = None
  d: jax.Array | None = None
  lam: jax.Array | None = None


def _causal_CC(c, transpose=False):
  rows = plgpu.broadcasted_iota(jnp.int32, (c, c), 0, layout=plgpu.Layout.WGMMA)
  cols = plgpu.broadcasted_iota(jnp.int32, (c, c), 1, layout=plgpu.Layout.WGMMA)
  return rows <= cols if transpose else rows >= cols


def _rows_cols(views, c):
  """A chunk's [C] float32 vector from its two shared-memory copies: as rows (x_i, constant along
  each row of a [C, C] array), as columns (x_j) and its last entry. Two copies: Mosaic GPU's
  layout inference (jax 0.12) finds no solution when one buffer is loaded both as rows and as
  columns."""
  row_C = plgpu.load(views[0], layout=plgpu.Layout.WGMMA.reduce(1))
  col_C = plgpu.load(views[1], layout=plgpu.Layout.WGMMA.reduce(0))
  return row_C, col_C, views[0][c - 1]


def _geometry(b_views, c, transpose=False, seg_views=None):
  """The factors of a chunk from two shared-memory copies of its inclusive cumulative log decay
  ([C] float32 each), or of an undecayed chunk (b_views None); with `transpose`, gamma is Gamma^T
  (the reverse pass's P^T). seg_views: two copies of the chunk's segment-start counts
  (`chunk_segments_BNC`), or None without segment ids."""
  causal_CC = _causal_CC(c, transpose)
  if seg_views is not None:
    seg_row_C, seg_col_C, seg_last = _rows_cols(seg_views, c)
    same_CC = lax.broadcast_in_dim(seg_row_C, (c, c), [0]) == lax.broadcast_in_dim(seg_col_C, (c, c), [1])
    causal_CC = causal_CC & same_CC   # symmetric: Gamma^T's support too
  if b_views is None:
    gamma_CC = jnp.where(causal_CC, 1.0, 0.0)
    if seg_views is None:
      return _Geometry(gamma_CC)
    e_C = d_C = lam = 1.0   # without a decay the factors are the masks themselves
  else:
    row_C, col_C, last = _rows_cols(b_views, c)
    # Masking the exponent, not the product: exp(b_i - b_j) above the diagonal overflows under a
    # strong decay (b_i - b_j > 0 there), and inf * 0 is NaN.
    diff_CC = lax.broadcast_in_dim(row_C, (c, c), [0]) - lax.broadcast_in_dim(col_C, (c, c), [1])
    gamma_CC = jnp.exp(jnp.where(causal_CC, -diff_CC if transpose else diff_CC, -jnp.inf))
    e_C, d_C, lam = jnp.exp(row_C), jnp.exp(last - row_C), jnp.exp(last)
    if seg_views is None:
      return _Geometry(gamma_CC, e_C, d_C, lam)
  # Selected, not multiplied, as `chunking.masked_exp`: exactly zero whatever the decay.
  return _Geometry(gamma_CC, jnp.where(seg_row_C == 0, e_C, 0.0), jnp.where(seg_row_C == seg_last, d_C, 0.0),
                   jnp.where(seg_last == 0, lam, 0.0))


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
  """lambda S + K^T (d * V); dv_CV: shared memory for d * V in 16 bits (None without a decay or
  segment ids)."""
  x_CV = v_CV
  if geo.d is not None:
    dv_CV[...] = _rows(geo.d, plgpu.load(v_CV, layout=plgpu.Layout.WGMMA).astype(jnp.float32)).astype(dv_CV.dtype)
    plgpu.commit_smem()
    x_CV = dv_CV
  decayed_KV = s_KV if geo.lam is None else geo.lam * s_KV
  return _accumulate(decayed_KV, (k_CK.transpose((1, 0)), x_CV))


class _Program(NamedTuple):
  """A chunk walk's program (grid (B*H, V/64)): its batch*head index, batch and head, its value
  columns, and the tokens of chunk n."""
  bh: jax.Array
  bi: jax.Array
  hi: jax.Array
  vcols: pl.Slice
  tok: object


def _walk_program(heads, c, q, k, x, per_chunk_BH=(), per_chunk_B=()):
  """The program of a walk over chunks and `_walk`'s sources for it: chunk n's q and k rows, x's
  rows in the program's value columns, then each per-chunk array of `per_chunk_BH` ([B*H, N, C])
  and of `per_chunk_B` ([B, N, C]) twice, for its copies loaded as rows and as columns
  (`_geometry` says why two)."""
  bh = lax.axis_index("bh")
  bi, hi = lax.div(bh, heads), lax.rem(bh, heads)
  vcols = pl.ds(lax.axis_index("v") * BLOCK_V, BLOCK_V)
  tok = lambda n: pl.ds(n * c, c)
  sources = [lambda n: q.at[bi, tok(n), hi], lambda n: k.at[bi, tok(n), hi], lambda n: x.at[bi, tok(n), hi, vcols]]
  for ref in per_chunk_BH:
    sources += [lambda n, ref=ref: ref.at[bh, n]] * 2
  for ref in per_chunk_B:
    sources += [lambda n, ref=ref: ref.at[bi, n]] * 2
  return _Program(bh, bi, hi, vcols, tok), sources


class _GradientProgram(NamedTuple):
  """A chunk-parallel gradient program (grid (B*H, N, K/64)): its batch*head index, chunk, key block,
  batch and head, its key columns and the chunk's tokens."""
  bh: jax.Array
  n: jax.Array
  kb: jax.Array
  bi: jax.Array
  hi: jax.Array
  kcols: pl.Slice
  tok: pl.Slice


def _gradient_program(heads, c):
  bh, n, kb = lax.axis_index("bh"), lax.axis_index("n"), lax.axis_index("kb")
  bi, hi = lax.div(bh, heads), lax.rem(bh, heads)
  return _GradientProgram(bh, n, kb, bi, hi, pl.ds(kb * BLOCK_K, BLOCK_K), pl.ds(n * c, c))


def _value_block(j):
  return pl.ds(j * BLOCK_V, BLOCK_V)


def _start_copies(pairs, bars):
  """Starts the (HBM source, shared-memory destination) copies of `pairs` on the last len(pairs)
  barriers of `bars` (a chunk-parallel program's one-time tiles, copied beside its walk over value
  blocks); returns the function that waits for them."""
  first = bars.shape[0] - len(pairs)
  for i, (src, dst) in enumerate(pairs):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[first + i])

  def wait():
    for i in range(len(pairs)):
      plgpu.barrier_wait(bars.at[first + i])
  return wait


def _forward_body(*refs, heads, scale, has_g, store_states, has_seg=False):
  it = iter(refs)
  q, k, v = next(it), next(it), next(it)
  cum_g = next(it) if has_g else None
  seg = next(it) if has_seg else None
  s0, o, s_final = next(it), next(it), next(it)
  states = next(it) if store_states else None
  q_buf, k_buf, v_buf = next(it), next(it), next(it)
  b_bufs = [next(it), next(it)] if has_g else []
  seg_bufs = [next(it), next(it)] if has_seg else []
  s_s, o_s, f32_s = next(it), next(it), next(it)
  dv_s = next(it) if has_g or has_seg else None
  bars = next(it)
  c = q_buf.shape[1]
  (bh, bi, hi, cols, tok), sources = _walk_program(heads, c, q, k, v, [cum_g] if has_g else [],
                                                   [seg] if has_seg else [])
  _fetch_one(s0.at[bh, :, cols], f32_s, bars.at[bars.shape[0] - 1])
  s_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def body(n, views, s):
    q_v, k_v, v_v = views[:3]
    geo = _factors(views[3:], c, has_g, has_seg)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's stores out of s_s and o_s
    s_s[...] = s.astype(s_s.dtype)
    plgpu.commit_smem()
    if store_states:
      plgpu.copy_smem_to_gmem(s_s, states.at[bh, n, :, cols])
    o_s[...] = _chunk_output(q_v, k_v, v_v, s_s, geo, scale).astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o.at[bi, tok(n), hi, cols])
    return _next_state(s, k_v, v_v, dv_s, geo)

  s = _walk(q.shape[1] // c, sources, [q_buf, k_buf, v_buf, *b_bufs, *seg_bufs], bars, body, s_init, reverse=False)
  _stage_out(s, f32_s, s_final.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _factors(views, c, has_g, has_seg, transpose=False):
  """`_geometry` from a chunk's views after its tiles: the two cumulative-decay copies (has_g),
  then the two segment-count copies (has_seg)."""
  return _geometry(views[:2] if has_g else None, c, transpose, views[2 * has_g:] if has_seg else None)


def _scratch_types(c, kd, mm, out_dtype, has_g, has_seg=False):
  """Shared memory (`state_pass_mosaic_gpu._scratch`): per chunk the q, k, v (and two
  cumulative-decay, two segment-count) buffers; the state's 16-bit copy, the output tile, a
  float32 staging buffer for the initial and final states (and d * V); one more TMA barrier for
  the initial state."""
  per_chunk = [((c, kd), mm, True), ((c, kd), mm, True), ((c, BLOCK_V), mm, True)]
  per_chunk += [((c,), jnp.float32, False)] * 2 * (has_g + has_seg)
  fixed = [((kd, BLOCK_V), mm, True), ((c, BLOCK_V), out_dtype, True), ((kd, BLOCK_V), jnp.float32, False)]
  fixed += [((c, BLOCK_V), mm, True)] if has_g or has_seg else []
  return scratch_within("Mosaic GPU fused GLA forward", per_chunk, fixed)


def _named(body, **params):
  """body with `params` bound, keeping its name: Mosaic GPU names the kernel after it (jaxprs,
  profiles), else "anonymous"."""
  return functools.update_wrapper(functools.partial(body, **params), body)


def _state_grad_scratch(c, kd, mm, do_dtype, has_g, has_seg):
  """`state_grads`' shared memory: per chunk the q, k, dO (and two cumulative-decay, two
  segment-count) buffers; H's 16-bit copy, the dv tile, a float32 staging buffer for dL/dS of the
  final and initial states (and e * dO); one more TMA barrier."""
  per_chunk = [((c, kd), mm, True), ((c, kd), mm, True), ((c, BLOCK_V), mm, True)]
  per_chunk += [((c,), jnp.float32, False)] * 2 * (has_g + has_seg)
  fixed = [((kd, BLOCK_V), mm, True), ((c, BLOCK_V), do_dtype, True), ((kd, BLOCK_V), jnp.float32, False)]
  fixed += [((c, BLOCK_V), mm, True)] if has_g or has_seg else []
  return scratch_within("Mosaic GPU fused GLA backward", per_chunk, fixed)


def _chunk_grad_scratch(c, mm, has_g, has_seg):
  """`chunk_grads`' shared memory: per value block the dO, V tiles and the S, H blocks; the
  chunk's q and k key block (and two cumulative-decay, two segment-count copies), dP * Gamma and
  the dq, dk tiles (and db's rows and columns); one TMA barrier per copy made once."""
  per_chunk = [((c, BLOCK_V), mm, True), ((c, BLOCK_V), mm, True), ((BLOCK_K, BLOCK_V), mm, True),
               ((BLOCK_K, BLOCK_V), mm, True)]
  fixed = [((c, BLOCK_K), mm, True), ((c, BLOCK_K), mm, True)]
  fixed += [((c,), jnp.float32, False)] * 2 * (has_g + has_seg)
  fixed += [((c, c), mm, True), ((c, BLOCK_K), mm, True), ((c, BLOCK_K), mm, True)]
  fixed += [((c,), jnp.float32, False)] * 2 if has_g else []
  n_once = 2 + 2 * (has_g + has_seg)   # q, k, the decay's, the counts'
  return scratch_within("Mosaic GPU fused GLA backward", per_chunk, fixed, n_once)


def fused_unsupported(chunk, kd, dtype=jnp.bfloat16):
  """Why `fused_gla` (forward and backward, each with a decay and segment ids, their largest shared
  memory) cannot take a chunk and key size, or None; `supports` covers the rest."""
  try:
    _scratch_types(chunk, kd, dtype, dtype, has_g=True, has_seg=True)
    _state_grad_scratch(chunk, kd, dtype, dtype, has_g=True, has_seg=True)
    _chunk_grad_scratch(chunk, dtype, has_g=True, has_seg=True)
  except ValueError as e:
    return str(e)
  return None


def input_problem(q, v, chunk, seg):
  """Why the fused Mosaic GPU kernels (this module's and the other fused modules') cannot take q and
  v (or do) at this chunk with these segment ids, or None; each op adds its own gates' checks."""
  why = supports(q.dtype, chunk, q.shape[-1], v.shape[-1])
  if why is None and q.shape[1] % chunk:
    why = f"T must be a multiple of the chunk (callers pad), got T={q.shape[1]}, chunk {chunk}"
  if why is None and seg is not None and seg.shape != q.shape[:2]:
    why = f"segment ids must be [B, T] = {q.shape[:2]}, got {seg.shape}"
  if why is None and v.dtype != q.dtype:
    why = f"q and v (or do) must share one dtype (their tiles go to buffers of q's), got {q.dtype} and {v.dtype}"
  return why


def _check(q, v, g, chunk, what="forward", seg=None):
  why = input_problem(q, v, chunk, seg)
  if why is None and g is not None and g.ndim != 3:
    why = f"only a scalar [B, T, H] decay or none, got g of shape {g.shape}"
  if why:
    raise ValueError(f"Mosaic GPU fused GLA {what}: {why}")


def chunk_cumsum_BHNC(g, chunk):
  """[B, T, H] log decay -> its float32 inclusive cumulative sum inside each chunk, [B*H, N, C]."""
  b, t, h = g.shape
  g_BHNC = g.astype(jnp.float32).transpose(0, 2, 1).reshape(b, h, t // chunk, chunk)
  return jnp.cumsum(g_BHNC, axis=-1).reshape(b * h, t // chunk, chunk)


def chunk_segments_BNC(seg, chunk):
  """[B, T] integer segment ids -> float32 [B, N, C]: per token the number of segment starts (a
  token whose id differs from the token before's; never token 0) from its chunk's first token up
  to it. 0 marks the segment of the state entering the chunk (the first chunk's state feeds the
  first segment), equal counts one segment: `chunking.chunk_masks`'s masks for contiguous ids (and
  a restart wherever the id changes, as the scan, should an id recur). Counts up to C, exact in
  float32: the kernels copy and load them as the cumulative decay."""
  b, t = seg.shape
  starts = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  return jnp.cumsum(starts.astype(jnp.float32).reshape(b, t // chunk, chunk), axis=-1)


def _per_chunk(g, seg, chunk):
  """The kernels' per-chunk inputs: the cumulative decay and the segment counts, where present."""
  return ([chunk_cumsum_BHNC(g, chunk)] if g is not None else []) + (
      [chunk_segments_BNC(seg, chunk)] if seg is not None else [])


def forward(q, k, v, g, s0, *, scale, chunk, store_states, interpret=False, seg=None):
  """O [B, T, H, V] in v's dtype, the final state [B*H, K, V] float32 and, if `store_states`, the
  state entering every chunk [B*H, N, K, V] in q's dtype (else None). q, k [B, T, H, K] and v
  [B, T, H, V] 16-bit with T a multiple of `chunk`; g [B, T, H] float32 log decay or None;
  s0 [B*H, K, V] float32; seg [B, T] integer segment ids or None."""
  _check(q, v, g, chunk, seg=seg)
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n = t // chunk
  has_g, has_seg = g is not None, seg is not None
  out_type = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32)]
  if store_states:
    out_type.append(jax.ShapeDtypeStruct((b * h, n, kd, vd), q.dtype))
  inputs = [q, k, v] + _per_chunk(g, seg, chunk) + [s0]
  body = _named(_forward_body, heads=h, scale=scale, has_g=has_g, store_states=store_states, has_seg=has_seg)
  res = _call(body, tuple(out_type), _scratch_types(chunk, kd, q.dtype, v.dtype, has_g, has_seg),
              (b * h, vd // BLOCK_V), interpret, *inputs)
  return res[0], res[1], res[2] if store_states else None


# ---------------------------------------------------------------------------------------------
# Backward


def _value_grad(q_CK, k_CK, do_CV, h_KV, geo, scale):
  """dV = P^T dO + d * (K H) of one chunk (float32) from shared-memory tiles; h_KV is H's 16-bit
  copy and geo.gamma is Gamma^T."""
  c = q_CK.shape[0]
  kh_CV = _matmul((c, do_CV.shape[1]), (k_CK, h_KV))
  pt_CC = (scale * _matmul((c, c), (k_CK, q_CK.transpose((1, 0)))) * geo.gamma).astype(q_CK.dtype)
  return _accumulate(kh_CV if geo.d is None else _rows(geo.d, kh_CV), (pt_CC, do_CV))


def _entering_state_grad(h_KV, q_CK, do_CV, edo_CV, geo, scale):
  """dS = lambda H + scale (e * Q)^T dO; edo_CV: shared memory for e * dO in 16 bits (as the
  Triton kernel rounds it; None without a decay or segment ids). The scale comes after the wgmma so that one
  float32 [K, BV] accumulator holds both terms (K 256: 128 registers a thread)."""
  x_CV = do_CV
  if geo.e is not None:
    edo_CV[...] = _rows(geo.e, plgpu.load(do_CV, layout=plgpu.Layout.WGMMA).astype(jnp.float32)).astype(edo_CV.dtype)
    plgpu.commit_smem()
    x_CV = edo_CV
  lam = 1.0 if geo.lam is None else geo.lam
  return scale * _accumulate((lam / scale) * h_KV, (q_CK.transpose((1, 0)), x_CV))


def _state_grad_body(*refs, heads, scale, has_g, has_seg=False):
  it = iter(refs)
  q, k, do = next(it), next(it), next(it)
  cum_g = next(it) if has_g else None
  seg = next(it) if has_seg else None
  ds_final, dv, ds_out, ds0 = next(it), next(it), next(it), next(it)
  q_buf, k_buf, do_buf = next(it), next(it), next(it)
  b_bufs = [next(it), next(it)] if has_g else []
  seg_bufs = [next(it), next(it)] if has_seg else []
  h_s, dv_s, f32_s = next(it), next(it), next(it)
  edo_s = next(it) if has_g or has_seg else None
  bars = next(it)
  c = q_buf.shape[1]
  (bh, bi, hi, cols, tok), sources = _walk_program(heads, c, q, k, do, [cum_g] if has_g else [],
                                                   [seg] if has_seg else [])
  _fetch_one(ds_final.at[bh, :, cols], f32_s, bars.at[bars.shape[0] - 1])
  h_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def body(n, views, h):
    q_v, k_v, do_v = views[:3]
    geo = _factors(views[3:], c, has_g, has_seg, transpose=True)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's stores out of h_s and dv_s
    h_s[...] = h.astype(h_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_s, ds_out.at[bh, n, :, cols])
    dv_s[...] = _value_grad(q_v, k_v, do_v, h_s, geo, scale).astype(dv_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dv_s, dv.at[bi, tok(n), hi, cols])
    return _entering_state_grad(h, q_v, do_v, edo_s, geo, scale)

  h = _walk(q.shape[1] // c, sources, [q_buf, k_buf, do_buf, *b_bufs, *seg_bufs], bars, body, h_init, reverse=True)
  _stage_out(h, f32_s, ds0.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _chunk_grad_body(*refs, heads, scale, has_g, has_seg=False):
  it = iter(refs)
  q, k, v, do = next(it), next(it), next(it), next(it)
  cum_g = next(it) if has_g else None
  seg = next(it) if has_seg else None
  s_in, ds_out, dq, dk = next(it), next(it), next(it), next(it)
  db_rows, db_cols = (next(it), next(it)) if has_g else (None, None)
  do_buf, v_buf, s_buf, h_buf = next(it), next(it), next(it), next(it)
  q_s, k_s = next(it), next(it)
  b_bufs = [next(it), next(it)] if has_g else []
  seg_bufs = [next(it), next(it)] if has_seg else []
  dpg_s, dq_s, dk_s = next(it), next(it), next(it)
  rows_s, cols_s = (next(it), next(it)) if has_g else (None, None)
  bars = next(it)
  c = q_s.shape[0]
  bh, n, kb, bi, hi, kcols, tok = _gradient_program(heads, c)
  vcols = _value_block
  # The chunk's key block, decay and segment counts, once: their copies run beside the walk over
  # value blocks.
  once = [(q.at[bi, tok, hi, kcols], q_s), (k.at[bi, tok, hi, kcols], k_s)]
  once += [(cum_g.at[bh, n], buf) for buf in b_bufs] + [(seg.at[bi, n], buf) for buf in seg_bufs]
  wait_once = _start_copies(once, bars)
  sources = [lambda j: do.at[bi, tok, hi, vcols(j)], lambda j: v.at[bi, tok, hi, vcols(j)],
             lambda j: s_in.at[bh, n, kcols, vcols(j)], lambda j: ds_out.at[bh, n, kcols, vcols(j)]]
  # WGMMA-layout zeros: wgmma accumulators take no other layout, and a bare constant has none yet.
  zeros = lambda *shape: plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
  sums = (zeros(c, c), zeros(c, BLOCK_K), zeros(c, BLOCK_K)) + ((zeros(BLOCK_K, BLOCK_V),) if has_g else ())

  def body(j, views, sums):
    """Sums over the value blocks: dP = dO V^T, dO S^T, V H^T and (for lambda's gradient) H * S."""
    do_v, v_v, s_v, h_v = views
    dp_CC, dos_CK, vh_CK = sums[:3]
    dp_CC = _accumulate(dp_CC, (do_v, v_v.transpose((1, 0))))
    dos_CK = _accumulate(dos_CK, (do_v, s_v.transpose((1, 0))))
    vh_CK = _accumulate(vh_CK, (v_v, h_v.transpose((1, 0))))
    if not has_g:
      return dp_CC, dos_CK, vh_CK
    load = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    return dp_CC, dos_CK, vh_CK, sums[3] + load(h_v) * load(s_v)

  sums = _walk(v.shape[-1] // BLOCK_V, sources, [do_buf, v_buf, s_buf, h_buf], bars, body, sums, reverse=False)
  dp_CC, dos_CK, vh_CK = sums[:3]
  wait_once()
  geo = _factors(b_bufs + seg_bufs, c, has_g, has_seg)
  dpg_s[...] = (scale * dp_CC * geo.gamma).astype(dpg_s.dtype)
  plgpu.commit_smem()
  dq_state_CK = scale * dos_CK if geo.e is None else _rows(scale * geo.e, dos_CK)
  dk_state_CK = vh_CK if geo.d is None else _rows(geo.d, vh_CK)
  dq_s[...] = _accumulate(dq_state_CK, (dpg_s, k_s)).astype(dq_s.dtype)
  dk_s[...] = _accumulate(dk_state_CK, (dpg_s.transpose((1, 0)), q_s)).astype(dk_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dq_s, dq.at[bi, tok, hi, kcols])
  plgpu.copy_smem_to_gmem(dk_s, dk.at[bi, tok, hi, kcols])
  if has_g:
    # This key block's share of every log-decay gradient term (each is a sum over key columns);
    # the column sums come back apart, in their own layout.
    load = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    p_CC = scale * _matmul((c, c), (q_s, k_s.transpose((1, 0)))) * geo.gamma
    dgam_CC = dp_CC * p_CC
    kdk_C = jnp.sum(dk_state_CK * load(k_s), axis=1)
    rows_C = jnp.sum(dq_state_CK * load(q_s), axis=1) - kdk_C + jnp.sum(dgam_CC, axis=1)
    # <H, S> in two reductions: jax 0.12's layout inference finds no solution for one [K, V] -> scalar.
    last = jnp.sum(kdk_C) + geo.lam * jnp.sum(jnp.sum(sums[3], axis=1))
    last_C = plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=plgpu.Layout.WGMMA.reduce(1)) == c - 1
    rows_s[...] = rows_C + jnp.where(last_C, last, 0.0)
    cols_s[...] = jnp.sum(dgam_CC, axis=0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(rows_s, db_rows.at[kb, bh, n])
    plgpu.copy_smem_to_gmem(cols_s, db_cols.at[kb, bh, n])
  plgpu.wait_smem_to_gmem(0)


def state_grads(q, k, g, do, ds_final, *, scale, chunk, interpret=False, seg=None):
  """The reverse pass: dv [B, T, H, V] in do's dtype, H = dL/dS of the state leaving every chunk
  [B*H, N, K, V] in q's dtype and the initial-state gradient [B*H, K, V] float32. q, k
  [B, T, H, K], do [B, T, H, V] in q's 16-bit dtype, T a multiple of `chunk`; g [B, T, H] float32
  log decay or None; ds_final [B*H, K, V] float32; seg [B, T] integer segment ids or None."""
  _check(q, do, g, chunk, "backward", seg)
  b, t, h, kd = q.shape
  vd = do.shape[-1]
  has_g, has_seg = g is not None, seg is not None
  mm = q.dtype
  out_type = (jax.ShapeDtypeStruct(do.shape, do.dtype), jax.ShapeDtypeStruct((b * h, t // chunk, kd, vd), mm),
              jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32))
  inputs = [q, k, do] + _per_chunk(g, seg, chunk) + [ds_final]
  body = _named(_state_grad_body, heads=h, scale=scale, has_g=has_g, has_seg=has_seg)
  return _call(body, out_type, _state_grad_scratch(chunk, kd, mm, do.dtype, has_g, has_seg), (b * h, vd // BLOCK_V),
               interpret, *inputs)


def chunk_grads(q, k, v, g, do, states, ds_out, *, scale, chunk, interpret=False, seg=None):
  """dq, dk [B, T, H, K] in q's dtype and dg [B, T, H] float32 (None without a decay), every chunk
  in parallel (one warpgroup per (batch*head, chunk, 64-wide key block), walking the value blocks)
  from the state entering it (`forward`'s `store_states`) and H of `state_grads`, both
  [B*H, N, K, V] in q's dtype. dg is the in-chunk reverse cumulative sum of db, whose key blocks'
  shares XLA adds. seg: [B, T] integer segment ids or None."""
  _check(q, v, g, chunk, "backward", seg)
  b, t, h, kd = q.shape
  n = t // chunk
  has_g, has_seg = g is not None, seg is not None
  mm = q.dtype
  out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, q.dtype)]
  out_type += [jax.ShapeDtypeStruct((kd // BLOCK_K, b * h, n, chunk), jnp.float32)] * 2 if has_g else []
  inputs = [q, k, v, do] + _per_chunk(g, seg, chunk) + [states, ds_out]
  body = _named(_chunk_grad_body, heads=h, scale=scale, has_g=has_g, has_seg=has_seg)
  res = plgpu.kernel(
      body, out_type=tuple(out_type), scratch_types=_chunk_grad_scratch(chunk, mm, has_g, has_seg),
      grid=(b * h, n, kd // BLOCK_K), grid_names=("bh", "n", "kb"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*inputs)
  if not has_g:
    return res[0], res[1], None
  db_BHNC = jnp.sum(res[2] - res[3], axis=0)
  dg_BHNC = jnp.flip(jnp.cumsum(jnp.flip(db_BHNC, -1), axis=-1), -1)
  return res[0], res[1], dg_BHNC.reshape(b, h, t).transpose(0, 2, 1)


def backward(q, k, v, g, states, do, ds_final, *, scale, chunk, interpret=False, seg=None):
  """(dq, dk, dv in the inputs' dtype, dg [B, T, H] float32 or None, ds0 [B*H, K, V] float32).
  states: what `forward(store_states=True)` returned; the other arguments as `forward`'s, do
  [B, T, H, V] in v's dtype, ds_final [B*H, K, V] float32."""
  dv, ds_out, ds0 = state_grads(q, k, g, do, ds_final, scale=scale, chunk=chunk, interpret=interpret, seg=seg)
  dq, dk, dg = chunk_grads(q, k, v, g, do, states, ds_out, scale=scale, chunk=chunk, interpret=interpret, seg=seg)
  return dq, dk, dv, dg, ds0


def make_fused_gla(forward, backward):
  """`forward` and `backward` (this module's contract; the per-dimension module's too) as one op
  under jax.custom_vjp: (scale, chunk, interpret, q, k, v, g, s0, seg=None) -> (O [B, T, H, V],
  final state [B, H, K, V] float32), with s0 [B, H, K, V] float32 and seg [B, T] integer segment
  ids or None; g's gradient comes back in g's dtype (`backward`)."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
  def fused(scale, chunk, interpret, q, k, v, g, s0, seg=None):
    b, _, h, _ = q.shape
    o, s_final, _ = forward(q, k, v, g, s0.reshape(b * h, *s0.shape[2:]), scale=scale, chunk=chunk,
                            store_states=False, interpret=interpret, seg=seg)
    return o, s_final.reshape(s0.shape)

  def fused_fwd(scale, chunk, interpret, q, k, v, g, s0, seg=None):
    b, _, h, _ = q.shape
    o, s_final, saved = forward(q, k, v, g, s0.reshape(b * h, *s0.shape[2:]), scale=scale, chunk=chunk,
                                store_states=True, interpret=interpret, seg=seg)
    return (o, s_final.reshape(s0.shape)), (q, k, v, g, seg, saved)

  def fused_bwd(scale, chunk, interpret, residuals, cotangents):
    q, k, v, g, seg, saved = residuals
    do, ds_final = cotangents
    b, _, h, _ = q.shape
    dq, dk, dv, dg, ds0 = backward(q, k, v, g, saved, do.astype(v.dtype),
                                   ds_final.reshape(b * h, *ds_final.shape[2:]), scale=scale, chunk=chunk,
                                   interpret=interpret, seg=seg)
    return dq, dk, dv, dg, ds0.reshape(ds_final.shape), None   # None: integer ids have no cotangent

  fused.defvjp(fused_fwd, fused_bwd)
  return fused


fused_gla = make_fused_gla(forward, backward)
