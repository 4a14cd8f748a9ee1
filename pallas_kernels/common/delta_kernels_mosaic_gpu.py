"""Pallas kernel (GPU, Mosaic GPU lowering: TMA and wgmma on Hopper) for the whole chunked
delta-rule forward, ungated or with a scalar per-token log decay (issue 12), with the contract of
`chunk_kernels_triton.forward` for beta [B, T, H] and g [B, T, H] or None.

The structure of `chunk_kernels_mosaic_gpu` (the fused GLA forward): one warpgroup per
(batch*head, 64-wide value block) walks the chunks; TMA copies each chunk's q, k, v tiles, its
beta and (gated) its in-chunk cumulative log decay b into shared memory, two buffer slots where
they fit; the float32 state stays in registers and its 16-bit copy in shared memory is a wgmma
operand and, with `store_states`, the stored state entering the chunk. With e, d, lambda and Gamma
as there (`chunk_kernels_triton`'s docstring), per chunk:

    A = strict_lower(beta_i (K K^T)_ij Gamma_ij),   T = (I + A)^-1
    X = T diag(beta) (V - e * (K S))               (= U - W S with W = T (beta e * K), U = T (beta * V))
    P = scale (Q K^T) * Gamma;   O = scale e * (Q S) + P X;   S' = lambda S + K^T (d * X)

X in that form takes K S and one [C, C] x [C, V] product; U - W S would take W = T (beta e * K)
([C, K] float32 in registers), U and W S. Every program of a head solves the same T; the Triton
forward solves it once in a separate kernel (`_wy_kernel`), at the price of W and U going
through HBM.

The solve. wgmma has no triangular solve, so T is built by recursive doubling: with T_s the
block-diagonal inverse of (I + A)'s diagonal s x s blocks and L_s the part of A in the lower-left
s x s block of every diagonal 2s x 2s block, T_2s = T_s - T_s (L_s T_s) (the 2 x 2 block inverse,
all blocks of a level at once), from T_1 = I up to T_C: 2 log2(C/2) matmuls of [C, C].
Not the nilpotent product (I - A)(I + A^2)(I + A^4)...: its powers of A grow far past T when keys
are correlated (the partial sums cancel), so it loses everything in float32 already. Measured in
a jnp prototype, C = 64, K = 64, beta = sigmoid(randn), keys k = normalise(randn + a u) with u
one direction shared by the chunk, relative error of X = T diag(beta) Y against float64, worst
of 5 chunks, ungated:
    a = 0:  product f32 5e-8,                   doubling f32 6e-8 / bf16 operands 1.9e-3 / hi+lo 2.8e-6
    a = 1:  product f32 1.1e-3 (hi+lo 3e-2),    doubling bf16 3.3e-3 / hi+lo 5.4e-6
    a = 10: product f32 36 (hi+lo 2.9e3),       doubling bf16 5.9e-3 / hi+lo 1.1e-5
(gated: the decay keeps A small; doubling bf16 1.9e-3, hi+lo 3.1e-6). So every product of the
solve and X's product run on split operands, x = hi + lo with hi = bf16(x), lo = bf16(x - hi):
a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi, three bf16 wgmmas with float32 accumulation, about 2^-16
relative per product (the Triton kernels round these products to TF32, 2^-11). With bf16
operands alone the kernel's final state drifted to 8.2e-3 of the float32 scan on the test with
correlated keys and a weak decay, near the 1e-2 bf16 tolerance (split: 4.1e-3; the Triton forward
in interpret mode: 6.1e-3). The other products have 16-bit inputs for operands, as the GLA
kernel's: K K^T, Q K^T, K S, Q S (S rounded to 16 bits), P X, K^T (d * X) (P, X, d * X rounded
to 16 bits, as the Triton forward rounds them).

wgmma needs C, K and V to be multiples of 64 and 16-bit operands (`state_pass_mosaic_gpu.supports`).
Differences from `chunk_kernels_triton.forward`: no segment ids, and with `store_states` only the
states entering the chunks come back (no W, X or T for a backward: there is no Mosaic GPU
delta-rule backward yet); the states are in q's dtype, as there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.chunk_kernels_mosaic_gpu import (
    _accumulate, _chunk_output, _geometry, _rows, chunk_cumsum_BHNC)
from pallas_kernels.common.state_pass_mosaic_gpu import (
    BLOCK_V, _call, _fetch_one, _matmul, _nbytes, _scratch, _stage_out, _walk, plgpu, supports)

SMEM_LIMIT = 227 * 1024   # shared memory per block on the H100


def _split(x):
  """A float32 register array as bf16 (hi, lo), hi + lo = x to about 2^-16."""
  hi = x.astype(jnp.bfloat16)
  return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _store_split(x, hi_s, lo_s):
  hi_s[...], lo_s[...] = _split(x)
  plgpu.commit_smem()


def _precise_matmul(a, b_hi, b_lo):
  """a @ b in float32 from a float32 register array and b's split in shared memory."""
  a_hi, a_lo = _split(a)
  zeros = jnp.zeros((a.shape[0], b_hi.shape[1]), jnp.float32)
  return _accumulate(zeros, (a_hi, b_hi), (a_hi, b_lo), (a_lo, b_hi))


def _iota_CC(c):
  rows = plgpu.broadcasted_iota(jnp.int32, (c, c), 0, layout=plgpu.Layout.WGMMA)
  return rows, plgpu.broadcasted_iota(jnp.int32, (c, c), 1, layout=plgpu.Layout.WGMMA)


def _unit_lower_inverse(a_CC, hi_s, lo_s):
  """(I + A)^-1 for a strictly lower triangular float32 A, by recursive doubling (module
  docstring); hi_s, lo_s: [C, C] bf16 shared memory for the split B operands."""
  c = a_CC.shape[0]
  rows, cols = _iota_CC(c)
  # (i ^ j) >> log2(s) == 1: i and j agree above bit log2(s) and differ in it, i.e. (i, j) lies in
  # an off-diagonal s x s block of a diagonal 2s x 2s block (the lower-left one, A being lower).
  xor_CC = rows ^ cols
  t_CC = jnp.where(rows == cols, 1.0, 0.0) - jnp.where(xor_CC == 1, a_CC, 0.0)   # T_2: T_1 = I
  level = 1
  while 2 ** level < c:
    l_CC = jnp.where(lax.shift_right_logical(xor_CC, level) == 1, a_CC, 0.0)
    _store_split(t_CC, hi_s, lo_s)
    lt_CC = _precise_matmul(l_CC, hi_s, lo_s)
    # Reading the accumulator waited for the wgmmas that read hi_s and lo_s: they can take L_s T_s.
    _store_split(lt_CC, hi_s, lo_s)
    t_CC = t_CC - _precise_matmul(t_CC, hi_s, lo_s)
    level += 1
  return t_CC


def _solve(k_CK, beta_views, geo, hi_s, lo_s):
  """T diag(beta) of one chunk (float32 registers); beta_views: two shared-memory copies of the
  chunk's beta, loaded as rows and as columns (`chunk_kernels_mosaic_gpu._geometry` says why two)."""
  c = k_CK.shape[0]
  beta_row_C = plgpu.load(beta_views[0], layout=plgpu.Layout.WGMMA.reduce(1))
  beta_col_C = plgpu.load(beta_views[1], layout=plgpu.Layout.WGMMA.reduce(0))
  kk_CC = _matmul((c, c), (k_CK, k_CK.transpose((1, 0))))
  rows, cols = _iota_CC(c)
  a_CC = jnp.where(rows > cols, _rows(beta_row_C, kk_CC * geo.gamma), 0.0)
  t_CC = _unit_lower_inverse(a_CC, hi_s, lo_s)
  return t_CC * lax.broadcast_in_dim(beta_col_C, (c, c), [1])


def _chunk_x(tb_CC, k_CK, v_CV, s_KV, geo, y_hi, y_lo):
  """X = T diag(beta) (V - e * (K S)) (float32); s_KV: the entering state's 16-bit copy."""
  ks_CV = _matmul((k_CK.shape[0], v_CV.shape[1]), (k_CK, s_KV))
  eks_CV = ks_CV if geo.e is None else _rows(geo.e, ks_CV)
  _store_split(plgpu.load(v_CV, layout=plgpu.Layout.WGMMA).astype(jnp.float32) - eks_CV, y_hi, y_lo)
  return _precise_matmul(tb_CC, y_hi, y_lo)


def _next_state(s_KV, k_CK, x_CV, x_s, geo):
  """lambda S + K^T (d * X); x_s holds X in 16 bits and, under a decay, takes d * X in its place
  (P X, its last reader, has finished: the output's accumulator was read)."""
  if geo.d is not None:
    x_s[...] = _rows(geo.d, x_CV).astype(x_s.dtype)
    plgpu.commit_smem()
  decayed_KV = s_KV if geo.lam is None else geo.lam * s_KV
  return _accumulate(decayed_KV, (k_CK.transpose((1, 0)), x_s))


def _forward_body(*refs, heads, scale, has_g, store_states):
  it = iter(refs)
  q, k, v, beta = next(it), next(it), next(it), next(it)
  cum_g = next(it) if has_g else None
  s0, o, s_final = next(it), next(it), next(it)
  states = next(it) if store_states else None
  q_buf, k_buf, v_buf, beta_row_buf, beta_col_buf = (next(it) for _ in range(5))
  b_bufs = [next(it), next(it)] if has_g else []
  s_s, o_s, f32_s, cc_hi, cc_lo, y_hi, y_lo, x_s = (next(it) for _ in range(8))
  bars = next(it)
  bh = lax.axis_index("bh")
  bi, hi = lax.div(bh, heads), lax.rem(bh, heads)
  c = q_buf.shape[1]
  tok = lambda n: pl.ds(n * c, c)
  vcols = pl.ds(lax.axis_index("v") * BLOCK_V, BLOCK_V)
  sources = [lambda n: q.at[bi, tok(n), hi], lambda n: k.at[bi, tok(n), hi],
             lambda n: v.at[bi, tok(n), hi, vcols]] + [lambda n: beta.at[bh, n]] * 2
  if has_g:
    sources += [lambda n: cum_g.at[bh, n]] * 2
  _fetch_one(s0.at[bh, :, vcols], f32_s, bars.at[bars.shape[0] - 1])
  s_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def body(n, views, s):
    q_v, k_v, v_v = views[:3]
    geo = _geometry(views[5:] if has_g else None, c)
    tb_CC = _solve(k_v, views[3:5], geo, cc_hi, cc_lo)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's stores out of s_s and o_s
    s_s[...] = s.astype(s_s.dtype)
    plgpu.commit_smem()
    if store_states:
      plgpu.copy_smem_to_gmem(s_s, states.at[bh, n, :, vcols])
    x_CV = _chunk_x(tb_CC, k_v, v_v, s_s, geo, y_hi, y_lo)
    x_s[...] = x_CV.astype(x_s.dtype)
    plgpu.commit_smem()
    o_s[...] = _chunk_output(q_v, k_v, x_s, s_s, geo, scale).astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o.at[bi, tok(n), hi, vcols])
    return _next_state(s, k_v, x_CV, x_s, geo)

  buffers = [q_buf, k_buf, v_buf, beta_row_buf, beta_col_buf, *b_bufs]
  s = _walk(q.shape[1] // c, sources, buffers, bars, body, s_init, reverse=False)
  _stage_out(s, f32_s, s_final.at[bh, :, vcols])
  plgpu.wait_smem_to_gmem(0)


def _scratch_types(c, kd, mm, out_dtype, has_g):
  """Shared memory (`state_pass_mosaic_gpu._scratch`): per chunk the q, k, v buffers and two
  copies each of beta (and of the cumulative decay); the state's 16-bit copy, the output tile, a
  float32 staging buffer for the initial and final states, the split [C, C] and [C, V] operands
  of the solve and of X, X (then d * X) in 16 bits; one more TMA barrier for the initial state.
  K 256 fits one buffer slot only; where even one overflows (a large K with chunk 128), a
  ValueError here rather than the Mosaic GPU compiler's on the GPU."""
  per_chunk = [((c, kd), mm, True), ((c, kd), mm, True), ((c, BLOCK_V), mm, True)]
  per_chunk += [((c,), jnp.float32, False)] * (4 if has_g else 2)
  fixed = [((kd, BLOCK_V), mm, True), ((c, BLOCK_V), out_dtype, True), ((kd, BLOCK_V), jnp.float32, False)]
  fixed += [((c, c), jnp.bfloat16, True)] * 2 + [((c, BLOCK_V), jnp.bfloat16, True)] * 2
  fixed += [((c, BLOCK_V), mm, True)]
  need = sum(_nbytes(shape, dtype) for shape, dtype, _ in per_chunk + fixed)
  if need > SMEM_LIMIT:
    raise ValueError(f"Mosaic GPU fused delta-rule forward: {need // 1024} KiB of shared memory per block, over "
                     f"the {SMEM_LIMIT // 1024} KiB of the H100; a smaller chunk_size fits")
  return _scratch(per_chunk, fixed)


def _check(q, v, beta, g, chunk):
  why = supports(q.dtype, chunk, q.shape[-1], v.shape[-1])
  if why is None and q.shape[1] % chunk:
    why = f"T must be a multiple of the chunk (callers pad), got T={q.shape[1]}, chunk {chunk}"
  if why is None and v.dtype != q.dtype:
    why = f"q and v must share one dtype (v's tiles go to buffers of q's), got {q.dtype} and {v.dtype}"
  if why is None and beta.shape != q.shape[:3]:
    why = f"beta must be [B, T, H] = {q.shape[:3]}, got {beta.shape}"
  if why is None and g is not None and g.shape != q.shape[:3]:
    why = f"only a scalar [B, T, H] decay or none, got g of shape {g.shape}"
  if why:
    raise ValueError(f"Mosaic GPU fused delta-rule forward: {why}")


def _per_chunk_BHNC(x_BTH, chunk):
  """[B, T, H] -> float32 [B*H, N, C]: one contiguous row per chunk for a TMA copy."""
  b, t, h = x_BTH.shape
  return x_BTH.astype(jnp.float32).transpose(0, 2, 1).reshape(b * h, t // chunk, chunk)


def forward(q, k, v, beta, g, s0, *, scale, chunk, store_states, interpret=False):
  """O [B, T, H, V] in v's dtype, the final state [B*H, K, V] float32 and, if `store_states`, the
  state entering every chunk [B*H, N, K, V] in q's dtype (else None). q, k [B, T, H, K] and v
  [B, T, H, V] 16-bit with T a multiple of `chunk`; beta [B, T, H]; g [B, T, H] log decay or
  None; s0 [B*H, K, V] float32."""
  _check(q, v, beta, g, chunk)
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n = t // chunk
  has_g = g is not None
  out_type = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32)]
  if store_states:
    out_type.append(jax.ShapeDtypeStruct((b * h, n, kd, vd), q.dtype))
  inputs = [q, k, v, _per_chunk_BHNC(beta, chunk)] + ([chunk_cumsum_BHNC(g, chunk)] if has_g else []) + [s0]
  # update_wrapper: Mosaic GPU names the kernel after the body (jaxprs, profiles), else "anonymous".
  body = functools.update_wrapper(
      functools.partial(_forward_body, heads=h, scale=scale, has_g=has_g, store_states=store_states), _forward_body)
  res = _call(body, tuple(out_type), _scratch_types(chunk, kd, q.dtype, v.dtype, has_g), (b * h, vd // BLOCK_V),
              interpret, *inputs)
  return res[0], res[1], res[2] if store_states else None
