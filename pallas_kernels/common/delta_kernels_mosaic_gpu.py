"""Pallas kernels (GPU, Mosaic GPU lowering: TMA and wgmma on Hopper) for the whole chunked delta
rule, ungated or with a scalar per-token log decay (issue 12): `forward`, with the contract of
`chunk_kernels_triton.forward` for beta [B, T, H] and g [B, T, H] or None, `backward`
(`state_grads`, then `chunk_grads`) and `fused_delta_rule`, the two under jax.custom_vjp.

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

PRESOLVE (the default; H100 fwd+bwd 3.2x faster ungated, 2.3x gated): `presolve`, one warpgroup per
(batch*head, chunk), solves T once per chunk off the walk's critical path and stores it as bf16
hi + lo (`_split`), two [B*H, N, C, C] arrays (16 KiB a chunk and head at C 64). T, not
T diag(beta): the reverse pass needs T^T alone, and T^T = diag(1/beta) (T diag(beta))^T fails
where beta is 0 (padding). The walks copy T's tiles by TMA as per-chunk inputs: the forward
takes X = T (beta * Y) as T_hi Y_hi + T_hi Y_lo + T_lo Y_hi (Y's split taken after the beta
scaling), `state_grads` R = T^T dX from the same tiles read transposed (wgmma's transposed
shared-memory A operand); neither needs the solve's [C, C] buffers any more, and in bf16 their
[C, 64] outputs reuse the product's split operand buffers, so every bf16 configuration that fitted
shared memory still fits (float16 ones gated or with segment ids at K 64 / chunk 128 and K 256 /
chunk 64 no longer do: they take the state-pass kernels). `forward(store_states=True)` keeps T in its `Residuals` for the
reverse pass (the forward computes it in any case).

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

The backward (hand-derived as `chunk_kernels_triton`'s; checked first in a jnp prototype against
`jax.vjp` of the float32 scan, to its 1e-7 in float64, correlated keys included), with H = dL/dS':

  `forward(store_states=True)` keeps the state entering every chunk and X as hi + lo, all in q's
  dtype (`Residuals`): X costs 2 V values a token, as many as the states' K V / C at K = V = 128,
  C = 64, where recomputing it in `chunk_grads` would cost a solve per chunk and key block. The lo part
  is for dA = -R X^T only: there dbeta's terms rowsum(R * (V - e * (K S))) and
  rowsum(dA * (K K^T) * Gamma) cancel down to rowsum(R * X) / beta, and X in 16 bits alone took
  dbeta to 7.9e-3 of the scan's with correlated keys in the prototype (hi + lo: 4.0e-3).
  `state_grads`: one warpgroup per (batch*head, 64-wide value block) walks the chunks in reverse
  with H in registers (float32), solving T^T = (I + A^T)^-1 by the same doubling (A^T is strictly
  upper: the 2 x 2 block inverse holds as well), storing H of every chunk and R in 16 bits:
    dX = P^T dO + d * (K H),   R = T^T dX (split operands, as X's product),   dV = beta * R
    dS = lambda H + scale (e * Q)^T dO - K^T (beta e * R)     (W^T dX = K^T diag(beta e) T^T dX)
  `chunk_grads`: one warpgroup per (batch*head, chunk, 64-wide key block), summing over value
  blocks dP = dO X^T, R X^T, dO S^T, X H^T, R S^T, R * V (and H * S); no solve, R holds T's part:
    dA = -R X^T on A's support,  R_K = T^T dW = -R S^T,  G = beta_i Gamma_ij dA_ij
    dQ = scale (dP * Gamma) K + scale e * (dO S^T)
    dK = scale (dP * Gamma)^T Q + d * (X H^T) + beta e * R_K + G K + G^T K
    dbeta = rowsum(R * V) + e * rowsum(R_K * K) + rowsum(dA * (K K^T) * Gamma)
    db = rowsum(Dg) - colsum(Dg) + scale e * rowsum((dO S^T) * Q) - d * rowsum((X H^T) * K)
         + beta e * rowsum(R_K * K) + [i = C] (sum_i d_i rowsum((X H^T) * K)_i + lambda <H, S>),
         Dg = dP * P + dA * A
  and dg is the in-chunk reverse cumulative sum of db (XLA, with the key blocks' shares of db and
  dbeta).

Segment ids (packed sequences) enter through the factors only, as in `chunk_kernels_mosaic_gpu`
(r_i: the segment-start count of `chunk_segments_BNC`, 0 for the segment of the state entering
the chunk): Gamma is kept where r_i = r_j, e where r_i = 0, d where r_i = r_C and lambda if
r_C = 0. Gamma's mask reaches A (no A_ij across segments: T solves each segment apart) and e's
reaches X's e * (K S) (W = T (beta e * K): the entering state feeds segment 0 only), as
`chunking.chunk_masks` in the XLA form. Every formula above, the backward's included, then holds
as written: a zeroed factor's terms contribute nothing, and dA meets A's masked support only
through Gamma (G, dbeta's and Dg's dA terms).

wgmma needs C, K and V to be multiples of 64 and 16-bit operands (`state_pass_mosaic_gpu.supports`).
Differences from `chunk_kernels_triton`: the stored states and X are in q's dtype.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.chunk_kernels_mosaic_gpu import (
    BLOCK_K, _accumulate, _chunk_output, _factors, _gradient_program, _per_chunk, _rows, _start_copies,
    _value_block, _value_grad, _walk_program, input_problem)
from pallas_kernels.common.state_pass_mosaic_gpu import (
    BLOCK_V, _call, _fetch_one, _matmul, _stage_out, _walk, plgpu, scratch_within, smem_overflow)

# Solve T = (I + A)^-1 once per chunk in a chunk-parallel kernel (`presolve`) and let the walks read
# it (hi + lo) by TMA, instead of every walk program solving it on its critical path. H100 run 40
# (experiments/mosaic_check.py, bf16 8x2048x16x128): fwd+bwd 1.29 ms with it against 4.07 without
# (gated 1.66 against 3.89); the forward 0.59 against 1.78. Read while tracing: clear jax's caches
# after changing it.
PRESOLVE = True


def _split(x):
  """A float32 register array as bf16 (hi, lo), hi + lo = x to about 2^-16."""
  hi = x.astype(jnp.bfloat16)
  return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _store_split(x, hi_s, lo_s):
  hi_s[...], lo_s[...] = _split(x)
  plgpu.commit_smem()


def _split_product(a_hi, a_lo, b_hi, b_lo):
  """a @ b in float32 from the splits of a (registers or shared memory) and of b (shared memory):
  a_hi b_hi + a_hi b_lo + a_lo b_hi, three bf16 wgmmas."""
  zeros = jnp.zeros((a_hi.shape[0], b_hi.shape[1]), jnp.float32)
  return _accumulate(zeros, (a_hi, b_hi), (a_hi, b_lo), (a_lo, b_hi))


def _precise_matmul(a, b_hi, b_lo):
  """a @ b in float32 from a float32 register array and b's split in shared memory."""
  return _split_product(*_split(a), b_hi, b_lo)


def _iota_CC(c):
  rows = plgpu.broadcasted_iota(jnp.int32, (c, c), 0, layout=plgpu.Layout.WGMMA)
  return rows, plgpu.broadcasted_iota(jnp.int32, (c, c), 1, layout=plgpu.Layout.WGMMA)


def _unit_triangular_inverse(a_CC, hi_s, lo_s):
  """(I + A)^-1 for a strictly lower or strictly upper triangular float32 A, by recursive
  doubling (module docstring; T_2s = T_s - T_s (L_s T_s) is the 2 x 2 block inverse of either
  kind, L_s then holding the lower-left or the upper-right blocks); hi_s, lo_s: [C, C] bf16 shared
  memory for the split B operands."""
  c = a_CC.shape[0]
  rows, cols = _iota_CC(c)
  # (i ^ j) >> log2(s) == 1: i and j agree above bit log2(s) and differ in it, i.e. (i, j) lies in
  # an off-diagonal s x s block of a diagonal 2s x 2s block (the one on A's side of the diagonal).
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


def _chunk_a(k_CK, beta_row_view, geo):
  """A = strict_lower(beta_i (K K^T)_ij Gamma_ij) of one chunk (float32 registers)."""
  c = k_CK.shape[0]
  beta_row_C = plgpu.load(beta_row_view, layout=plgpu.Layout.WGMMA.reduce(1))
  kk_CC = _matmul((c, c), (k_CK, k_CK.transpose((1, 0))))
  rows, cols = _iota_CC(c)
  return jnp.where(rows > cols, _rows(beta_row_C, kk_CC * geo.gamma), 0.0)


def _solve(k_CK, beta_views, geo, hi_s, lo_s):
  """T diag(beta) of one chunk (float32 registers); beta_views: two shared-memory copies of the
  chunk's beta, loaded as rows and as columns (`chunk_kernels_mosaic_gpu._geometry` says why two)."""
  c = k_CK.shape[0]
  beta_col_C = plgpu.load(beta_views[1], layout=plgpu.Layout.WGMMA.reduce(0))
  t_CC = _unit_triangular_inverse(_chunk_a(k_CK, beta_views[0], geo), hi_s, lo_s)
  return t_CC * lax.broadcast_in_dim(beta_col_C, (c, c), [1])


def _split_columns(cc_hi, cc_lo):
  """[C, 64] views of the solve's split buffers for a [C, V block] operand's split, which the
  kernels store once the solve's wgmmas have finished (its result was read): K 256 fits shared
  memory so (16 KiB less at C 64)."""
  return tuple(buf.at[:, pl.ds(0, BLOCK_V)] for buf in (cc_hi, cc_lo))


def _chunk_x(solved, k_CK, v_CV, s_KV, geo, y_hi, y_lo):
  """X = T diag(beta) (V - e * (K S)) (float32); s_KV: the entering state's 16-bit copy; solved:
  T diag(beta) in registers, or (beta_row_view, T_hi, T_lo) with T's split in shared memory
  (PRESOLVE: then X = T (beta * Y), as T is stored without beta for the reverse pass's T^T)."""
  ks_CV = _matmul((k_CK.shape[0], v_CV.shape[1]), (k_CK, s_KV))
  eks_CV = ks_CV if geo.e is None else _rows(geo.e, ks_CV)
  y_CV = plgpu.load(v_CV, layout=plgpu.Layout.WGMMA).astype(jnp.float32) - eks_CV
  if not isinstance(solved, tuple):
    _store_split(y_CV, y_hi, y_lo)
    return _precise_matmul(solved, y_hi, y_lo)
  beta_row_view, t_hi, t_lo = solved
  _store_split(_rows(plgpu.load(beta_row_view, layout=plgpu.Layout.WGMMA.reduce(1)), y_CV), y_hi, y_lo)
  return _split_product(t_hi, t_lo, y_hi, y_lo)


def _next_state(s_KV, k_CK, x_CV, x_s, geo):
  """lambda S + K^T (d * X); x_s holds X in 16 bits and, under a decay or segment ids, takes d * X
  in its place (P X, its last reader, has finished: the output's accumulator was read; a TMA store
  of X out of it, the caller has waited for)."""
  if geo.d is not None:
    x_s[...] = _rows(geo.d, x_CV).astype(x_s.dtype)
    plgpu.commit_smem()
  decayed_KV = s_KV if geo.lam is None else geo.lam * s_KV
  return _accumulate(decayed_KV, (k_CK.transpose((1, 0)), x_s))


def _walk_solved(bh, sources, buffers, t_split, t_bufs):
  """Adds T's split ([B*H, N, C, C] hi, lo) to a walk's per-chunk sources and buffers (PRESOLVE);
  its views come last."""
  if t_split is None:
    return sources, buffers
  return sources + [lambda n, ref=ref: ref.at[bh, n] for ref in t_split], buffers + list(t_bufs)


def _forward_body(*refs, heads, scale, has_g, store_states, has_seg=False, presolve=False):
  it = iter(refs)
  q, k, v, beta = next(it), next(it), next(it), next(it)
  cum_g = next(it) if has_g else None
  seg = next(it) if has_seg else None
  t_split = (next(it), next(it)) if presolve else None
  s0, o, s_final = next(it), next(it), next(it)
  states, x_hi, x_lo = (next(it), next(it), next(it)) if store_states else (None, None, None)
  q_buf, k_buf, v_buf, beta_row_buf, beta_col_buf = (next(it) for _ in range(5))
  b_bufs = [next(it), next(it)] if has_g else []
  seg_bufs = [next(it), next(it)] if has_seg else []
  t_bufs = (next(it), next(it)) if presolve else ()
  s_s, o_s, f32_s = (next(it) for _ in range(3))
  if presolve:
    # Y's split takes [C, 64] buffers of its own; in bf16, X (hi, lo) goes out through them once
    # X's product has finished (its result was read): K 256 fits shared memory so.
    y_hi, y_lo = next(it), next(it)
    if _reuses_split(q.dtype):
      x_s, x_lo_s = y_hi, (y_lo if store_states else None)
    else:
      x_s = next(it)
      x_lo_s = next(it) if store_states else None
  else:
    cc_hi, cc_lo, x_s = (next(it) for _ in range(3))
    x_lo_s = next(it) if store_states else None
    y_hi, y_lo = _split_columns(cc_hi, cc_lo)
  bars = next(it)
  c = q_buf.shape[1]
  (bh, bi, hi, vcols, tok), sources = _walk_program(heads, c, q, k, v, [beta] + ([cum_g] if has_g else []),
                                                    [seg] if has_seg else [])
  buffers = [q_buf, k_buf, v_buf, beta_row_buf, beta_col_buf, *b_bufs, *seg_bufs]
  sources, buffers = _walk_solved(bh, sources, buffers, t_split, t_bufs)
  _fetch_one(s0.at[bh, :, vcols], f32_s, bars.at[bars.shape[0] - 1])
  s_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def body(n, views, s):
    q_v, k_v, v_v = views[:3]
    geo = _factors(views[5:5 + 2 * (has_g + has_seg)], c, has_g, has_seg)
    solved = (views[3], *views[-2:]) if presolve else _solve(k_v, views[3:5], geo, cc_hi, cc_lo)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's stores out of s_s, o_s, x_s, x_lo_s
    s_s[...] = s.astype(s_s.dtype)
    plgpu.commit_smem()
    if store_states:
      plgpu.copy_smem_to_gmem(s_s, states.at[bh, n, :, vcols])
    x_CV = _chunk_x(solved, k_v, v_v, s_s, geo, y_hi, y_lo)
    x_hi_CV = x_CV.astype(x_s.dtype)
    x_s[...] = x_hi_CV
    if store_states:
      x_lo_s[...] = (x_CV - x_hi_CV.astype(jnp.float32)).astype(x_lo_s.dtype)
    plgpu.commit_smem()
    if store_states:
      plgpu.copy_smem_to_gmem(x_s, x_hi.at[bi, tok(n), hi, vcols])
      plgpu.copy_smem_to_gmem(x_lo_s, x_lo.at[bi, tok(n), hi, vcols])
    o_s[...] = _chunk_output(q_v, k_v, x_s, s_s, geo, scale).astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o.at[bi, tok(n), hi, vcols])
    if store_states and geo.d is not None:
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # every store but O's has read its buffer: x_s is free
    return _next_state(s, k_v, x_CV, x_s, geo)

  s = _walk(q.shape[1] // c, sources, buffers, bars, body, s_init, reverse=False)
  _stage_out(s, f32_s, s_final.at[bh, :, vcols])
  plgpu.wait_smem_to_gmem(0)


def _reuses_split(mm):
  """Whether a PRESOLVE walk's 16-bit [C, 64] outputs reuse the bf16 split buffers of its product's
  operand (they must share its dtype)."""
  return jnp.dtype(mm) == jnp.bfloat16


def _forward_layout(c, kd, mm, out_dtype, has_g, store_states, has_seg=False, presolve=False):
  """Shared memory (`state_pass_mosaic_gpu._scratch`): per chunk the q, k, v buffers and two
  copies each of beta (and of the cumulative decay, of the segment counts), with `presolve` T's
  split [C, C] tiles too; the state's 16-bit copy, the output tile, a float32 staging buffer for
  the initial and final states, the split [C, C] operands of the solve (and of X's product,
  `_split_columns`) or with `presolve` X's product's split [C, 64] operand alone, X (then, with a
  decay or segment ids, d * X) in 16 bits and, with `store_states`, X's low part (with `presolve`
  in bf16: in the split's buffers); one more TMA barrier for the initial state. K 256 fits one
  buffer slot only."""
  per_chunk = [((c, kd), mm, True), ((c, kd), mm, True), ((c, BLOCK_V), mm, True)]
  per_chunk += [((c,), jnp.float32, False)] * 2 * (1 + has_g + has_seg)
  per_chunk += [((c, c), jnp.bfloat16, True)] * 2 * presolve
  fixed = [((kd, BLOCK_V), mm, True), ((c, BLOCK_V), out_dtype, True), ((kd, BLOCK_V), jnp.float32, False)]
  fixed += [((c, BLOCK_V) if presolve else (c, c), jnp.bfloat16, True)] * 2
  if not (presolve and _reuses_split(mm)):
    fixed += [((c, BLOCK_V), mm, True)] * (2 if store_states else 1)
  return per_chunk, fixed, 1


def _state_grad_layout(c, kd, mm, has_g, has_seg=False, presolve=False):
  """`state_grads`' shared memory: per chunk the q, k, dO buffers and two copies each of beta (and
  of the cumulative decay, of the segment counts), with `presolve` T's split [C, C] tiles too; H's
  16-bit copy, the dv and R tiles (with `presolve` in bf16: in dX's split's buffers), a float32
  staging buffer for dL/dS of the final and initial states, the solve's split [C, C] operands (and
  dX's, `_split_columns`) or with `presolve` dX's split [C, 64] alone, -(beta e * R) / scale (and,
  with a decay or segment ids, e * dO) in 16 bits; one more TMA barrier."""
  per_chunk = [((c, kd), mm, True), ((c, kd), mm, True), ((c, BLOCK_V), mm, True)]
  per_chunk += [((c,), jnp.float32, False)] * 2 * (1 + has_g + has_seg)
  per_chunk += [((c, c), jnp.bfloat16, True)] * 2 * presolve
  fixed = [((kd, BLOCK_V), mm, True)]
  fixed += [] if presolve and _reuses_split(mm) else [((c, BLOCK_V), mm, True)] * 2
  fixed += [((kd, BLOCK_V), jnp.float32, False)]
  fixed += [((c, BLOCK_V) if presolve else (c, c), jnp.bfloat16, True)] * 2
  fixed += [((c, BLOCK_V), mm, True)] * (2 if has_g or has_seg else 1)
  return per_chunk, fixed, 1


def _presolve_layout(c, kd, mm, has_g, has_seg=False):
  """`presolve`'s shared memory: the chunk's k tile and beta (and two copies of the cumulative
  decay, of the segment counts), the solve's split [C, C] operands (then T's split, on its way
  out); one TMA barrier for each input."""
  n_in = 2 + 2 * (has_g + has_seg)
  fixed = [((c, kd), mm, True)] + [((c,), jnp.float32, False)] * (n_in - 1) + [((c, c), jnp.bfloat16, True)] * 2
  return [], fixed, n_in


def _chunk_grad_layout(c, mm, has_g, has_seg=False):
  """`chunk_grads`' shared memory: per value block the dO, V, X hi, X lo, R tiles and S, H blocks;
  the chunk's q and k key block (then dq and dk), beta (and two copies of the cumulative decay, of
  the segment counts), scale dP * Gamma and G in 16 bits, dbeta's (and db's rows and columns)
  share; one TMA barrier for each of the chunk's once-copied inputs."""
  per_chunk = [((c, BLOCK_V), mm, True)] * 5 + [((BLOCK_K, BLOCK_V), mm, True)] * 2
  n_once = 3 + 2 * (has_g + has_seg)   # q, k, beta, the decay's and the counts' copies
  fixed = [((c, BLOCK_K), mm, True)] * 2 + [((c,), jnp.float32, False)] * (n_once - 2)
  fixed += [((c, c), mm, True)] * 2 + [((c,), jnp.float32, False)] * (3 if has_g else 1)
  return per_chunk, fixed, n_once


def fused_unsupported(dtype, chunk, kd, gated, segments=False) -> str | None:
  """Why `fused_delta_rule` (forward and backward) cannot take 16-bit inputs of this dtype, chunk
  and key size (a gated one or not, with segment ids or not) within the H100's shared memory, or
  None; the callers run the state-pass kernels then."""
  layouts = {"forward": _forward_layout(chunk, kd, dtype, dtype, gated, True, segments, PRESOLVE),
             "reverse pass": _state_grad_layout(chunk, kd, dtype, gated, segments, PRESOLVE),
             "chunk gradients": _chunk_grad_layout(chunk, dtype, gated, segments)}
  if PRESOLVE:
    layouts["solve"] = _presolve_layout(chunk, kd, dtype, gated, segments)
  return smem_overflow({f"Mosaic GPU fused delta-rule {what}": layout for what, layout in layouts.items()},
                       f" at K {kd}, chunk {chunk}")


def _check(q, v, beta, g, chunk, what="forward", seg=None):
  why = input_problem(q, v, chunk, seg)
  if why is None and beta.shape != q.shape[:3]:
    why = f"beta must be [B, T, H] = {q.shape[:3]}, got {beta.shape}"
  if why is None and g is not None and g.shape != q.shape[:3]:
    why = f"only a scalar [B, T, H] decay or none, got g of shape {g.shape}"
  if why:
    raise ValueError(f"Mosaic GPU fused delta-rule {what}: {why}")


def _per_chunk_BHNC(x_BTH, chunk):
  """[B, T, H] -> float32 [B*H, N, C]: one contiguous row per chunk for a TMA copy."""
  b, t, h = x_BTH.shape
  return x_BTH.astype(jnp.float32).transpose(0, 2, 1).reshape(b * h, t // chunk, chunk)


def _named(body, **params):
  """body with `params` bound, keeping its name: Mosaic GPU names the kernel after it (jaxprs,
  profiles), else "anonymous"."""
  return functools.update_wrapper(functools.partial(body, **params), body)


class Residuals(NamedTuple):
  """What `forward(store_states=True)` keeps for `backward`: the state entering every chunk
  [B*H, N, K, V] and X as hi + lo, both [B, T, H, V], all in q's dtype; under PRESOLVE T's split
  [B*H, N, C, C] bf16 (`presolve`), which the reverse pass reads transposed instead of solving."""
  states: jax.Array
  x_hi: jax.Array
  x_lo: jax.Array
  t_hi: jax.Array | None = None
  t_lo: jax.Array | None = None


def _presolve_body(*refs, heads, has_g, has_seg):
  it = iter(refs)
  k, beta = next(it), next(it)
  cum_g = next(it) if has_g else None
  seg = next(it) if has_seg else None
  t_hi, t_lo = next(it), next(it)
  k_s, beta_s = next(it), next(it)
  b_bufs = [next(it), next(it)] if has_g else []
  seg_bufs = [next(it), next(it)] if has_seg else []
  cc_hi, cc_lo, bars = next(it), next(it), next(it)
  bh, n = lax.axis_index("bh"), lax.axis_index("n")
  bi, hi = lax.div(bh, heads), lax.rem(bh, heads)
  c = k_s.shape[0]
  once = [(k.at[bi, pl.ds(n * c, c), hi], k_s), (beta.at[bh, n], beta_s)]
  once += [(cum_g.at[bh, n], buf) for buf in b_bufs] + [(seg.at[bi, n], buf) for buf in seg_bufs]
  _start_copies(once, bars)()
  geo = _factors(b_bufs + seg_bufs, c, has_g, has_seg)
  t_CC = _unit_triangular_inverse(_chunk_a(k_s, beta_s, geo), cc_hi, cc_lo)
  # The doubling's last product has finished (its result was read): T's split goes out through
  # its operand buffers.
  _store_split(t_CC, cc_hi, cc_lo)
  plgpu.copy_smem_to_gmem(cc_hi, t_hi.at[bh, n])
  plgpu.copy_smem_to_gmem(cc_lo, t_lo.at[bh, n])
  plgpu.wait_smem_to_gmem(0)


def presolve(k, beta, g, *, chunk, interpret=False, seg=None):
  """T = (I + A)^-1 of every chunk as bf16 hi + lo (`_split`), two [B*H, N, C, C] arrays, every
  chunk in parallel (one warpgroup per (batch*head, chunk)). T without beta: the forward takes
  T (beta * Y), the reverse pass T^T dX, from the same tiles. k [B, T, H, K] 16-bit, beta [B, T, H],
  g [B, T, H] log decay or None, seg [B, T] integer segment ids or None."""
  b, t, h, kd = k.shape
  n = t // chunk
  has_g, has_seg = g is not None, seg is not None
  t_type = jax.ShapeDtypeStruct((b * h, n, chunk, chunk), jnp.bfloat16)
  inputs = [k, _per_chunk_BHNC(beta, chunk)] + _per_chunk(g, seg, chunk)
  return plgpu.kernel(
      _named(_presolve_body, heads=h, has_g=has_g, has_seg=has_seg), out_type=(t_type, t_type),
      scratch_types=scratch_within("Mosaic GPU fused delta-rule solve",
                                   *_presolve_layout(chunk, kd, k.dtype, has_g, has_seg)),
      grid=(b * h, n), grid_names=("bh", "n"), interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*inputs)


def forward(q, k, v, beta, g, s0, *, scale, chunk, store_states, interpret=False, seg=None):
  """O [B, T, H, V] in v's dtype, the final state [B*H, K, V] float32 and, if `store_states`, the
  `Residuals` for `backward` (else None). q, k [B, T, H, K] and v [B, T, H, V] 16-bit with T a
  multiple of `chunk`; beta [B, T, H]; g [B, T, H] log decay or None; s0 [B*H, K, V] float32;
  seg [B, T] integer segment ids or None. Under PRESOLVE T comes from `presolve`, which runs in
  both modes (the walk needs T); `store_states` keeps it for the reverse pass too, which then
  solves nothing (16 KiB a chunk and head at C 64, as much as X's hi + lo at V 64)."""
  _check(q, v, beta, g, chunk, seg=seg)
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n = t // chunk
  has_g, has_seg = g is not None, seg is not None
  t_split = tuple(presolve(k, beta, g, chunk=chunk, interpret=interpret, seg=seg)) if PRESOLVE else ()
  out_type = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32)]
  if store_states:
    out_type += [jax.ShapeDtypeStruct((b * h, n, kd, vd), q.dtype)] + [jax.ShapeDtypeStruct(v.shape, q.dtype)] * 2
  inputs = [q, k, v, _per_chunk_BHNC(beta, chunk)] + _per_chunk(g, seg, chunk) + [*t_split, s0]
  body = _named(_forward_body, heads=h, scale=scale, has_g=has_g, store_states=store_states, has_seg=has_seg,
                presolve=PRESOLVE)
  layout = _forward_layout(chunk, kd, q.dtype, v.dtype, has_g, store_states, has_seg, PRESOLVE)
  scratch = scratch_within("Mosaic GPU fused delta-rule forward", *layout)
  res = _call(body, tuple(out_type), scratch, (b * h, vd // BLOCK_V), interpret, *inputs)
  return res[0], res[1], Residuals(*res[2:], *t_split) if store_states else None


# ---------------------------------------------------------------------------------------------
# Backward


def _transposed_solve(k_CK, beta_col_view, geo, hi_s, lo_s):
  """T^T = (I + A^T)^-1 of one chunk (float32 registers), geo.gamma being Gamma^T: A^T_ij =
  (K K^T)_ij Gamma_ji beta_j for i < j, strictly upper, which the doubling inverts as it does A
  (the reverse pass needs T^T only, and Gamma^T is its P^T's factor)."""
  c = k_CK.shape[0]
  beta_col_C = plgpu.load(beta_col_view, layout=plgpu.Layout.WGMMA.reduce(0))
  kk_CC = _matmul((c, c), (k_CK, k_CK.transpose((1, 0))))
  rows, cols = _iota_CC(c)
  at_CC = jnp.where(rows < cols, kk_CC * geo.gamma * lax.broadcast_in_dim(beta_col_C, (c, c), [1]), 0.0)
  return _unit_triangular_inverse(at_CC, hi_s, lo_s)


def _entering_state_grad(h_KV, q_CK, k_CK, do_CV, mz_CV, edo_CV, geo, scale):
  """dS = lambda H + scale (e * Q)^T dO - K^T (beta e * R) in one float32 accumulator, as
  scale (lambda / scale H + Q^T (e * dO) + K^T mz) with mz_CV holding -(beta e * R) / scale in 16
  bits; edo_CV: shared memory for e * dO in 16 bits (None without a decay or segment ids)."""
  x_CV = do_CV
  if geo.e is not None:
    edo_CV[...] = _rows(geo.e, plgpu.load(do_CV, layout=plgpu.Layout.WGMMA).astype(jnp.float32)).astype(edo_CV.dtype)
    plgpu.commit_smem()
    x_CV = edo_CV
  lam = 1.0 if geo.lam is None else geo.lam
  return scale * _accumulate((lam / scale) * h_KV, (q_CK.transpose((1, 0)), x_CV), (k_CK.transpose((1, 0)), mz_CV))


def _state_grad_body(*refs, heads, scale, has_g, has_seg=False, presolve=False):
  it = iter(refs)
  q, k, do, beta = next(it), next(it), next(it), next(it)
  cum_g = next(it) if has_g else None
  seg = next(it) if has_seg else None
  t_split = (next(it), next(it)) if presolve else None
  ds_final, dv, r, ds_out, ds0 = (next(it) for _ in range(5))
  q_buf, k_buf, do_buf, beta_row_buf, beta_col_buf = (next(it) for _ in range(5))
  b_bufs = [next(it), next(it)] if has_g else []
  seg_bufs = [next(it), next(it)] if has_seg else []
  t_bufs = (next(it), next(it)) if presolve else ()
  h_s = next(it)
  # With `presolve` in bf16, dv and R go out through dX's split buffers once R's product has
  # finished (its result was read): K 256 fits shared memory so.
  dv_s, r_s = (None, None) if presolve and _reuses_split(q.dtype) else (next(it), next(it))
  f32_s, cc_hi, cc_lo, mz_s = (next(it) for _ in range(4))
  edo_s = next(it) if has_g or has_seg else None
  bars = next(it)
  # The split of dX: [C, 64] buffers of its own with `presolve`, else the solve's.
  y_hi, y_lo = (cc_hi, cc_lo) if presolve else _split_columns(cc_hi, cc_lo)
  if dv_s is None:
    dv_s, r_s = y_hi, y_lo
  c = q_buf.shape[1]
  (bh, bi, hi, vcols, tok), sources = _walk_program(heads, c, q, k, do, [beta] + ([cum_g] if has_g else []),
                                                    [seg] if has_seg else [])
  buffers = [q_buf, k_buf, do_buf, beta_row_buf, beta_col_buf, *b_bufs, *seg_bufs]
  sources, buffers = _walk_solved(bh, sources, buffers, t_split, t_bufs)
  _fetch_one(ds_final.at[bh, :, vcols], f32_s, bars.at[bars.shape[0] - 1])
  h_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def body(n, views, h):
    q_v, k_v, do_v = views[:3]
    geo = _factors(views[5:5 + 2 * (has_g + has_seg)], c, has_g, has_seg, transpose=True)
    tt_CC = None if presolve else _transposed_solve(k_v, views[4], geo, cc_hi, cc_lo)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's stores out of h_s, dv_s, r_s
    h_s[...] = h.astype(h_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_s, ds_out.at[bh, n, :, vcols])
    # R = T^T dX on split operands, as the forward's X = T diag(beta) Y: T^T is as ill-conditioned
    # as T with correlated keys, and R carries every gradient through the solve. With `presolve`
    # T^T is the stored T's split read transposed (wgmma's transposed shared-memory A operand).
    _store_split(_value_grad(q_v, k_v, do_v, h_s, geo, scale), y_hi, y_lo)
    if presolve:
      r_CV = _split_product(*(t_v.transpose((1, 0)) for t_v in views[-2:]), y_hi, y_lo)
    else:
      r_CV = _precise_matmul(tt_CC, y_hi, y_lo)
    beta_C = plgpu.load(views[3], layout=plgpu.Layout.WGMMA.reduce(1))
    dv_s[...] = _rows(beta_C, r_CV).astype(dv_s.dtype)
    r_s[...] = r_CV.astype(r_s.dtype)
    beta_e_C = beta_C if geo.e is None else beta_C * geo.e
    mz_s[...] = _rows(beta_e_C * (-1.0 / scale), r_CV).astype(mz_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dv_s, dv.at[bi, tok(n), hi, vcols])
    plgpu.copy_smem_to_gmem(r_s, r.at[bi, tok(n), hi, vcols])
    return _entering_state_grad(h, q_v, k_v, do_v, mz_s, edo_s, geo, scale)

  h = _walk(q.shape[1] // c, sources, buffers, bars, body, h_init, reverse=True)
  _stage_out(h, f32_s, ds0.at[bh, :, vcols])
  plgpu.wait_smem_to_gmem(0)


def _chunk_grad_body(*refs, heads, scale, has_g, has_seg=False):
  it = iter(refs)
  q, k, v, do, x_hi, x_lo, r, beta = (next(it) for _ in range(8))
  cum_g = next(it) if has_g else None
  seg = next(it) if has_seg else None
  s_in, ds_out, dq, dk, dbeta = (next(it) for _ in range(5))
  db_rows, db_cols = (next(it), next(it)) if has_g else (None, None)
  do_buf, v_buf, x_hi_buf, x_lo_buf, r_buf, s_buf, h_buf = (next(it) for _ in range(7))
  q_s, k_s, beta_s = next(it), next(it), next(it)
  b_bufs = [next(it), next(it)] if has_g else []
  seg_bufs = [next(it), next(it)] if has_seg else []
  dpg_s, g_s, dbeta_s = (next(it) for _ in range(3))
  rows_s, cols_s = (next(it), next(it)) if has_g else (None, None)
  bars = next(it)
  c = q_s.shape[0]
  bh, n, kb, bi, hi, kcols, tok = _gradient_program(heads, c)
  vcols = _value_block
  # The chunk's key block, beta, decay and segment counts, once: their copies run beside the walk
  # over value blocks.
  once = [(q.at[bi, tok, hi, kcols], q_s), (k.at[bi, tok, hi, kcols], k_s), (beta.at[bh, n], beta_s)]
  once += [(cum_g.at[bh, n], buf) for buf in b_bufs] + [(seg.at[bi, n], buf) for buf in seg_bufs]
  wait_once = _start_copies(once, bars)
  per_token = [do, v, x_hi, x_lo, r]
  sources = [lambda j, ref=ref: ref.at[bi, tok, hi, vcols(j)] for ref in per_token]
  sources += [lambda j: s_in.at[bh, n, kcols, vcols(j)], lambda j: ds_out.at[bh, n, kcols, vcols(j)]]
  # WGMMA-layout zeros: wgmma accumulators take no other layout, and a bare constant has none yet.
  zeros = lambda *shape: plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
  load = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
  sums = (zeros(c, c), zeros(c, c), zeros(c, BLOCK_K), zeros(c, BLOCK_K), zeros(c, BLOCK_K), zeros(c, BLOCK_V))
  sums += (zeros(BLOCK_K, BLOCK_V),) if has_g else ()

  def body(j, views, sums):
    """Sums over the value blocks: dP = dO X^T, R X^T (X as hi + lo: dA = -R X^T feeds dbeta,
    where its terms cancel down to rowsum(R * X) / beta), dO S^T, X H^T, R S^T, R * V (dbeta's
    rowsum(R * V)) and, for lambda's gradient, H * S."""
    do_v, v_v, x_hi_v, x_lo_v, r_v, s_v, h_v = views
    dp_CC, rx_CC, dos_CK, xh_CK, rs_CK, rv_CV = sums[:6]
    dp_CC = _accumulate(dp_CC, (do_v, x_hi_v.transpose((1, 0))))
    rx_CC = _accumulate(rx_CC, (r_v, x_hi_v.transpose((1, 0))), (r_v, x_lo_v.transpose((1, 0))))
    dos_CK = _accumulate(dos_CK, (do_v, s_v.transpose((1, 0))))
    xh_CK = _accumulate(xh_CK, (x_hi_v, h_v.transpose((1, 0))))
    rs_CK = _accumulate(rs_CK, (r_v, s_v.transpose((1, 0))))
    rv_CV = rv_CV + load(r_v) * load(v_v)
    hs_KV = (sums[6] + load(h_v) * load(s_v),) if has_g else ()
    return (dp_CC, rx_CC, dos_CK, xh_CK, rs_CK, rv_CV) + hs_KV

  buffers = [do_buf, v_buf, x_hi_buf, x_lo_buf, r_buf, s_buf, h_buf]
  sums = _walk(v.shape[-1] // BLOCK_V, sources, buffers, bars, body, sums, reverse=False)
  dp_CC, rx_CC, dos_CK, xh_CK, rs_CK, rv_CV = sums[:6]
  wait_once()
  geo = _factors(b_bufs + seg_bufs, c, has_g, has_seg)
  beta_C = plgpu.load(beta_s, layout=plgpu.Layout.WGMMA.reduce(1))
  rows, cols = _iota_CC(c)
  da_CC = jnp.where(rows > cols, -rx_CC, 0.0)   # dA = -R X^T on A's support
  kkg_CC = _matmul((c, c), (k_s, k_s.transpose((1, 0)))) * geo.gamma   # this key block's share of K K^T, decayed
  dakk_CC = da_CC * kkg_CC
  dpg_s[...] = (scale * dp_CC * geo.gamma).astype(dpg_s.dtype)
  g_s[...] = _rows(beta_C, geo.gamma * da_CC).astype(g_s.dtype)   # G = beta_i Gamma_ij dA_ij
  e_C = geo.e
  beta_e_C = beta_C if e_C is None else beta_C * e_C
  dq_state_CK = scale * dos_CK if e_C is None else _rows(scale * e_C, dos_CK)
  dxh_CK = xh_CK if geo.d is None else _rows(geo.d, xh_CK)
  k_CK = load(k_s)
  rsk_C = jnp.sum(rs_CK * k_CK, axis=1)   # -rowsum(R_K * K), R_K = T^T dW = -R S^T
  # dbeta = rowsum(R * V) + e * rowsum(R_K * K) + rowsum(dA * (K K^T) * Gamma): the key blocks
  # add their shares of the last two, the first key block the first.
  first_block = jnp.where(kb == 0, 1.0, 0.0)
  dbeta_s[...] = (first_block * jnp.sum(rv_CV, axis=1) - (rsk_C if e_C is None else e_C * rsk_C)
                  + jnp.sum(dakk_CC, axis=1))
  if has_g:
    # This key block's share of every log-decay gradient term (each is a sum over key columns);
    # the column sums come back apart, in their own layout. Dg = dP * P + dA * A, the gradient
    # of log Gamma.
    p_CC = scale * _matmul((c, c), (q_s, k_s.transpose((1, 0)))) * geo.gamma
    dgam_CC = dp_CC * p_CC + _rows(beta_C, dakk_CC)
    dxhk_C = jnp.sum(dxh_CK * k_CK, axis=1)
    rows_C = jnp.sum(dq_state_CK * load(q_s), axis=1) - dxhk_C - beta_e_C * rsk_C + jnp.sum(dgam_CC, axis=1)
    # <H, S> in two reductions: jax 0.12's layout inference finds no solution for one [K, V] -> scalar.
    last = jnp.sum(dxhk_C) + geo.lam * jnp.sum(jnp.sum(sums[6], axis=1))
    last_C = plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=plgpu.Layout.WGMMA.reduce(1)) == c - 1
    rows_s[...] = rows_C + jnp.where(last_C, last, 0.0)
    cols_s[...] = jnp.sum(dgam_CC, axis=0)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dbeta_s, dbeta.at[kb, bh, n])
  if has_g:
    plgpu.copy_smem_to_gmem(rows_s, db_rows.at[kb, bh, n])
    plgpu.copy_smem_to_gmem(cols_s, db_cols.at[kb, bh, n])
  # dK = scale (dP * Gamma)^T Q + d * (X H^T) + beta e * R_K + G K + G^T K.
  dq_CK = _accumulate(dq_state_CK, (dpg_s, k_s))
  dk_CK = _accumulate(dxh_CK - _rows(beta_e_C, rs_CK), (dpg_s.transpose((1, 0)), q_s), (g_s, k_s),
                      (g_s.transpose((1, 0)), k_s))
  # dq and dk go out through q_s and k_s, which nothing reads any more (the wgmmas above have
  # finished: their results were read): chunk 128 fits shared memory so.
  q_s[...] = dq_CK.astype(q_s.dtype)
  k_s[...] = dk_CK.astype(k_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_s, dq.at[bi, tok, hi, kcols])
  plgpu.copy_smem_to_gmem(k_s, dk.at[bi, tok, hi, kcols])
  plgpu.wait_smem_to_gmem(0)


def state_grads(q, k, beta, g, do, ds_final, *, scale, chunk, interpret=False, seg=None, t_split=None):
  """The reverse pass: dv [B, T, H, V] in do's dtype, R = T^T dX [B, T, H, V] and H = dL/dS of the
  state leaving every chunk [B*H, N, K, V], both in q's dtype, and the initial-state gradient
  [B*H, K, V] float32. q, k [B, T, H, K], do [B, T, H, V] in q's 16-bit dtype, T a multiple of
  `chunk`; beta [B, T, H]; g [B, T, H] log decay or None; ds_final [B*H, K, V] float32; seg [B, T]
  integer segment ids or None; t_split: `presolve`'s (T_hi, T_lo), read instead of solving, or
  None."""
  _check(q, do, beta, g, chunk, "backward", seg)
  b, t, h, kd = q.shape
  vd = do.shape[-1]
  has_g, has_seg = g is not None, seg is not None
  mm = q.dtype
  out_type = (jax.ShapeDtypeStruct(do.shape, do.dtype), jax.ShapeDtypeStruct(do.shape, mm),
              jax.ShapeDtypeStruct((b * h, t // chunk, kd, vd), mm), jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32))
  has_t = t_split is not None
  inputs = [q, k, do, _per_chunk_BHNC(beta, chunk)] + _per_chunk(g, seg, chunk) + [*(t_split or ()), ds_final]
  body = _named(_state_grad_body, heads=h, scale=scale, has_g=has_g, has_seg=has_seg, presolve=has_t)
  layout = _state_grad_layout(chunk, kd, mm, has_g, has_seg, has_t)
  scratch = scratch_within("Mosaic GPU fused delta-rule backward", *layout)
  return _call(body, out_type, scratch, (b * h, vd // BLOCK_V), interpret, *inputs)


def chunk_grads(q, k, v, beta, g, do, residuals, r, ds_out, *, scale, chunk, interpret=False, seg=None):
  """dq, dk [B, T, H, K] in q's dtype, dbeta [B, T, H] float32 and dg [B, T, H] float32 (None
  without a decay), every chunk in parallel (one warpgroup per (batch*head, chunk, 64-wide key
  block), walking the value blocks) from `forward`'s `Residuals`, R of `state_grads` [B, T, H, V]
  and H [B*H, N, K, V]. No solve: R holds T's part. XLA adds the key blocks' shares of dbeta and
  db; dg is the in-chunk reverse cumulative sum of db. seg: [B, T] integer segment ids or None."""
  _check(q, v, beta, g, chunk, "backward", seg)
  b, t, h, kd = q.shape
  n = t // chunk
  has_g, has_seg = g is not None, seg is not None
  mm = q.dtype
  shares = jax.ShapeDtypeStruct((kd // BLOCK_K, b * h, n, chunk), jnp.float32)
  out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, q.dtype), shares]
  out_type += [shares] * 2 if has_g else []
  inputs = [q, k, v, do, residuals.x_hi, residuals.x_lo, r, _per_chunk_BHNC(beta, chunk)]
  inputs += _per_chunk(g, seg, chunk) + [residuals.states, ds_out]
  body = _named(_chunk_grad_body, heads=h, scale=scale, has_g=has_g, has_seg=has_seg)
  scratch = scratch_within("Mosaic GPU fused delta-rule backward", *_chunk_grad_layout(chunk, mm, has_g, has_seg))
  res = plgpu.kernel(
      body, out_type=tuple(out_type), scratch_types=scratch, grid=(b * h, n, kd // BLOCK_K),
      grid_names=("bh", "n", "kb"), interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*inputs)
  to_BTH = lambda x_BHNC: x_BHNC.reshape(b, h, t).transpose(0, 2, 1)
  dbeta = to_BTH(jnp.sum(res[2], axis=0))
  if not has_g:
    return res[0], res[1], dbeta, None
  db_BHNC = jnp.sum(res[3] - res[4], axis=0)
  return res[0], res[1], dbeta, to_BTH(jnp.flip(jnp.cumsum(jnp.flip(db_BHNC, -1), axis=-1), -1))


def backward(q, k, v, beta, g, residuals, do, ds_final, *, scale, chunk, interpret=False, seg=None):
  """(dq, dk, dv in the inputs' dtype, dbeta [B, T, H] float32, dg [B, T, H] float32 or None, ds0
  [B*H, K, V] float32). residuals: what `forward(store_states=True)` returned; the other
  arguments as `forward`'s, do [B, T, H, V] in v's dtype, ds_final [B*H, K, V] float32."""
  t_split = None if residuals.t_hi is None else (residuals.t_hi, residuals.t_lo)
  dv, r, ds_out, ds0 = state_grads(q, k, beta, g, do, ds_final, scale=scale, chunk=chunk, interpret=interpret,
                                   seg=seg, t_split=t_split)
  dq, dk, dbeta, dg = chunk_grads(q, k, v, beta, g, do, residuals, r, ds_out, scale=scale, chunk=chunk,
                                  interpret=interpret, seg=seg)
  return dq, dk, dv, dbeta, dg, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def fused_delta_rule(scale, chunk, interpret, q, k, v, beta, g, s0, seg=None):
  """(O [B, T, H, V], final state [B, H, K, V] float32) with `forward`'s contract (s0 [B, H, K, V]
  float32, seg [B, T] integer segment ids or None), differentiable through `backward`."""
  b, _, h, _ = q.shape
  o, s_final, _ = forward(q, k, v, beta, g, s0.reshape(b * h, *s0.shape[2:]), scale=scale, chunk=chunk,
                          store_states=False, interpret=interpret, seg=seg)
  return o, s_final.reshape(s0.shape)


def _fused_delta_rule_fwd(scale, chunk, interpret, q, k, v, beta, g, s0, seg=None):
  b, _, h, _ = q.shape
  o, s_final, residuals = forward(q, k, v, beta, g, s0.reshape(b * h, *s0.shape[2:]), scale=scale, chunk=chunk,
                                  store_states=True, interpret=interpret, seg=seg)
  return (o, s_final.reshape(s0.shape)), (q, k, v, beta, g, seg, residuals)


def _fused_delta_rule_bwd(scale, chunk, interpret, saved, cotangents):
  q, k, v, beta, g, seg, residuals = saved
  do, ds_final = cotangents
  b, _, h, _ = q.shape
  dq, dk, dv, dbeta, dg, ds0 = backward(q, k, v, beta, g, residuals, do.astype(v.dtype),
                                        ds_final.reshape(b * h, *ds_final.shape[2:]), scale=scale, chunk=chunk,
                                        interpret=interpret, seg=seg)
  dg = None if g is None else dg.astype(g.dtype)
  return dq, dk, dv, dbeta.astype(beta.dtype), dg, ds0.reshape(ds_final.shape), None   # None: ids have no cotangent


fused_delta_rule.defvjp(_fused_delta_rule_fwd, _fused_delta_rule_bwd)
