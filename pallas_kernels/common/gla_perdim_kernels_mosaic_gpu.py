"""Pallas kernels (GPU, Mosaic GPU lowering: TMA and wgmma on Hopper) for the whole chunked GLA
forward and backward with a per-dimension log decay g [B, T, H, K] (the "gla_perdim" op, issue 12):
`forward`, with the contract of `chunk_kernels_triton.forward` for beta None and a [B, T, H, K]
decay, `backward` (`state_grads`, then `chunk_grads`) and `fused_gla_perdim`, the two under
jax.custom_vjp. The scalar-decay kernels are `chunk_kernels_mosaic_gpu`, whose structure these
follow.

With b the chunk's inclusive cumulative log decay per key dimension ([C, K], `chunk_cumsum`), e = exp(b),
d = exp(b_C - b) ([C, K]) and lambda = exp(b_C) ([K]):

    P_ij = sum_k q_ik k_jk exp(b_ik - b_jk)   (j <= i, same segment)
    O = scale (Q * e) S + scale P V,           S' = diag(lambda) S + (K * d)^T V

P does not factor into (Q e^b)(K e^-b)^T without overflow (b reaches -80 within a chunk under a
strong decay). The Triton kernels (`_scores_kernel`) take P in 16-row blocks against a reference
per block, the diagonal 16 x 16 blocks by a matmul where their decay range allows and by an exact
column loop elsewhere; wgmma's 64-row tiles suit neither. Here every pair j < i falls in exactly
one level s = 1, 2, 4, ..., C/2: the highest bit in which i and j differ is log2(s), so i lies in
the odd s-block and j in the even s-block of one aligned 2s-block. With r = b at the last row of
that even s-block (the row before i's s-block), b non-increasing (g <= 0) gives b_i <= r <= b_j, so

    P_ij = (q_i e^(b_i - r)) . (k_j e^(r - b_j))     both factors <= 1,

and one wgmma per level takes all of its pairs at once: the rows of odd s-blocks as Q'_s (their
factor against their own pair's r), the rows of even s-blocks as K'_s (the others zero), the
product then selected to the pairs' own 2s-blocks (across pairs the references differ, but every
operand is <= 1: the discarded entries are bounded, never inf). The diagonal P_ii = q_i . k_i has
no decay. So log2(C) wgmmas of [C, 64] x [64, C] per 64 key columns, no run-time range check,
no fallback: exact under any decay up to the operands' 16-bit rounding, as the Triton matmul
blocks round theirs. A factor underflows only where the term it belongs to is below e^-87 of the
undecayed ones (float16 operands: e^-17, under their rounding of the output too). Per level the
rows need r from a row of b that depends on the row: a gather, which wgmma does as
G_s (b_hi + b_lo) with G_s the 0/1 [C, C] selection (a register operand) and b split into bf16
hi + lo; r need only be near b's row (the same r, bit for bit, enters both factors of a pair, so
it cancels exactly), so the split's 2^-17 is plenty. Each row is odd or even at a level, so one
exp per element serves both factors: exp(+-(b - r)). The levels run as a loop over a traced level:
unrolled, each level's straight-line code of its own, the chunk-gradient kernel took 2.1-2.4x
its device time on the H100 and the scores kernel 1.1x (run 46, experiments/NOTES.md).

Kernels (16-bit q, k, v, float32 accumulation; C a power of two, 64 or 128; K, V multiples of 64):
  `_perdim_scores_body` (B*H, N): P (scaled, in q's dtype), e * Q and d * K (q's dtype) and
      lambda (float32), segment masks included, for the walks (the Triton `scores`' outputs).
  `_perdim_forward_body` (B*H, V/64): walks the chunks with the float32 state in registers
      (WGMMA layout): O = scale (e * Q) S + P V,  S' = lambda S + (d * K)^T V;  with
      `store_states` the state entering every chunk in q's dtype.
  `_perdim_state_grad_body` (B*H, V/64): walks the chunks in reverse with H = dL/dS' in
      registers, storing H of every chunk in q's dtype:
        dV = P^T dO + (d * K) H,   dS = lambda H + scale (e * Q)^T dO.
  `_perdim_chunk_grad_body` (B*H, N, K/64): sums over the value blocks dP = dO V^T, dO S^T,
      V H^T and H S^T (whose diagonal is sum_v H_kv S_kv), then, with P's gradient taken back
      through the levels (dQ'_s = dP_s K'_s, dK'_s = dP_s^T Q'_s, dP_s: scale dP on level s's
      pairs):
        dQ = scale e * (dO S^T) + sum_s e^(b - r_s) * dQ'_s + diag(dP) K
        dK = d * (V H^T)        + sum_s e^(r_s - b) * dK'_s + diag(dP) Q
        db = Q * dQ - K * dK + [i = C] (colsum(K * d * (V H^T)) + lambda * diag(H S^T))
      and dg is the in-chunk reverse cumulative sum of db (XLA). K'_s and Q'_s enter these
      products as bf16 hi + lo: db pairs each term of row i's Q * dQ with its twin in row j's
      K * dK, and with 16-bit factors alone the twins rounded apart (dg's error against the scan
      tripled). db is formed without the terms that cancel exactly (the diagonal's q_i k_i dP_ii
      in both products, the last row's own share of its column sum): under a strong decay they
      are O(1) against a db of e^-20, and their float32 rounding would be all of dg.
  (Hand-derived as `chunk_kernels_mosaic_gpu`'s docstring, per dimension: e's gradient gives
  Q * (scale e * dO S^T), d's gives -K * (d * V H^T) on each row and its sum on the last, lambda's
  lambda <H, S> per key row on the last, P's Q * dQ^P - K * dK^P; checked against `jax.vjp` of
  the float32 scan in tests/kernels/test_mosaic_gpu_gla_perdim.py.)

Segment ids (packed sequences) enter through the factors, as in `chunk_kernels_mosaic_gpu`
(`chunk_segments_BNC` counts, 0 for the segment of the state entering the chunk): P and dP are
kept where the counts agree, e where the count is 0, d where it equals the last row's, lambda if
the last row's is 0. Every formula above, the db terms included, then holds as written.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.chunk_kernels_mosaic_gpu import (
    BLOCK_K, _accumulate, _gradient_program, _named, _rows, _start_copies, _value_block, chunk_segments_BNC,
    input_problem, make_fused_gla)
from pallas_kernels.common.state_pass_mosaic_gpu import (
    BLOCK_V, _fetch_one, _matmul, _stage_out, _walk, plgpu, scratch_within, smem_overflow)

WGMMA = None if plgpu is None else plgpu.Layout.WGMMA
# Buffer slots of the chunk-parallel kernels (`scores`, `chunk_grads`), read at trace time. Two let
# a program's next key or value block load while it works on this one; one halves those buffers,
# so that two programs share an SM (at chunk 64 a block then asks for 80 and 104 KiB, against 112
# and 136 with two, of the SM's 228): their time is the latency of short wgmma chains, which a
# second program on the SM hides. Run 46 (H100, experiments/NOTES.md): one slot 2.62 ms of device
# time for fwd+bwd at 8x2048x16x128, two 3.24. At chunk 128 both kernels take one slot either way
# (two would not fit). jit caches keep the value a function was traced with.
CHUNK_PARALLEL_SLOTS = 1


def _iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)


def _index(n, dim):
  """The row (dim 0) or column (dim 1) indices of a WGMMA-layout array as an [n] vector, for
  `_spread`: the level masks, shifted and compared at vector size, are then loop-invariant in
  two small vectors rather than in [C, C] iotas that the compiler hoists out of the level loop
  (32 registers each)."""
  return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=WGMMA.reduce(1 - dim))


def _spread(vec, shape, dim):
  return lax.broadcast_in_dim(vec, shape, [dim])


def _zeros(*shape):
  """WGMMA-layout zeros: wgmma accumulators take no other layout, and a bare constant has none yet."""
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), WGMMA)


def _load(ref):
  return plgpu.load(ref, layout=WGMMA).astype(jnp.float32)


def _shr(x, n):
  return lax.shift_right_logical(x, jnp.int32(n))


class _Levels:
  """One chunk's decay in the level form (module docstring), for one block of 64 key columns:
  `factor(l)` is exp(+-(b - r_l)) [C, 64] (the odd rows' factor of Q'_l, the even rows' of K'_l)
  and the row parity, `pairs(l)` the [C, C] mask of level l's pairs. b_ref: b [C, 64] float32 in
  shared memory, read at every level rather than held (what a level loop holds stays live in
  registers through all of it). b_hi, b_lo: bf16 [C, 64] shared memory for the gather's split
  operand, written here once or, if `rewrite` (the caller reuses the buffers between levels),
  before every level's gather."""

  def __init__(self, b_ref, b_hi, b_lo, rewrite=False):
    self.b_ref = b_ref
    self.c = b_ref.shape[0]
    self.b_hi, self.b_lo, self.rewrite = b_hi, b_lo, rewrite
    self.n_levels = self.c.bit_length() - 1
    if not rewrite:
      self._store()

  def _store(self):
    _store_split(_load(self.b_ref), self.b_hi, self.b_lo)
    plgpu.commit_smem()

  def factor(self, level):
    """(exp(+-(b - r)) [C, 64] float32, odd [C, 64] bool) of level `level` (s = 2^level)."""
    s = 1 << level
    if self.rewrite:
      self._store()
    c = self.c
    # r's row for row i: the last row of the even s-block of i's 2s-block.
    rows_C = _index(c, 0)
    target_C = jnp.left_shift(_shr(rows_C, level + 1), jnp.int32(level + 1)) + (s - 1)
    gather_CC = jnp.where(_spread(_index(c, 1), (c, c), 1) == _spread(target_C, (c, c), 0), 1.0, 0.0)
    gather_CC = gather_CC.astype(self.b_hi.dtype)
    # The gather's result was read: its wgmmas are done with b_hi, b_lo before the next level's.
    r_CK = _accumulate(_zeros(*self.b_ref.shape), (gather_CC, self.b_hi), (gather_CC, self.b_lo))
    b_CK = _load(self.b_ref)
    odd_CK = _spread(_shr(rows_C, level) & 1, b_CK.shape, 0) == 1
    return jnp.exp(jnp.where(odd_CK, b_CK - r_CK, r_CK - b_CK)), odd_CK

  def pairs(self, level):
    """[C, C] bool: (i, j) a pair of level `level`: the same 2s-block, i in its odd half, j in its even."""
    c = self.c
    rows_C, cols_C = _index(c, 0), _index(c, 1)
    same = _spread(_shr(rows_C, level + 1), (c, c), 0) == _spread(_shr(cols_C, level + 1), (c, c), 1)
    odd_i = _spread(_shr(rows_C, level) & 1, (c, c), 0) == 1
    return same & odd_i & (_spread(_shr(cols_C, level) & 1, (c, c), 1) == 0)

  def diagonal(self):
    c = self.c
    return _spread(_index(c, 0), (c, c), 0) == _spread(_index(c, 1), (c, c), 1)


class _Segments:
  """A chunk's segment-start counts (`chunk_segments_BNC`) from two shared-memory copies (rows and
  columns: Mosaic GPU's layout inference, jax 0.12, finds no solution for one buffer loaded as
  both), or None without segment ids: the masks of P, e, d and lambda."""

  def __init__(self, views, c):
    self.row_C = plgpu.load(views[0], layout=WGMMA.reduce(1))
    self.col_C = plgpu.load(views[1], layout=WGMMA.reduce(0))
    self.last = views[0][c - 1]
    self.c = c

  def same_CC(self):
    c = self.c
    return _spread(self.row_C, (c, c), 0) == _spread(self.col_C, (c, c), 1)


def _store_split(x, hi_s, lo_s):
  """A float32 register array into shared memory as 16-bit hi + lo (x to about 2^-16 relative for
  bf16), the buffers' dtype; the caller commits."""
  x_hi = x.astype(hi_s.dtype)
  hi_s[...] = x_hi
  lo_s[...] = (x - x_hi.astype(jnp.float32)).astype(lo_s.dtype)


def _decay_in(b_CK, segs):
  """e = exp(b) [C, 64], zero outside the segment of the state entering the chunk (exactly zero
  whatever the decay)."""
  e_CK = jnp.exp(b_CK)
  if segs is None:
    return e_CK
  return jnp.where(_spread(segs.row_C, b_CK.shape, 0) == 0, e_CK, 0.0)


def _decay_out(b_CK, segs):
  """d = exp(b_C - b) [C, 64] and lambda = exp(b_C) [64] (a column vector), zero outside the segment
  of the chunk's last row (exactly zero whatever the decay)."""
  c, kd = b_CK.shape
  # b_C as a column vector: the last row summed out (b's own load in the WGMMA layout; a second
  # load of the same buffer as a vector would conflict in layout inference).
  last_K = jnp.sum(jnp.where(_iota(b_CK.shape, 0) == c - 1, b_CK, 0.0), axis=0)
  d_CK, lam_K = jnp.exp(_spread(last_K, (c, kd), 1) - b_CK), jnp.exp(last_K)
  if segs is None:
    return d_CK, lam_K
  seg_CK = _spread(segs.row_C, (c, kd), 0)
  # lambda <= 1 is finite: a 0 / 1 factor zeroes it (Mosaic GPU selects on no scalar predicate
  # with a vector operand).
  return jnp.where(seg_CK == segs.last, d_CK, 0.0), lam_K * jnp.where(segs.last == 0, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Forward


def _perdim_scores_body(*refs, heads, scale, has_seg):
  it = iter(refs)
  q, k, cum_g = next(it), next(it), next(it)
  seg = next(it) if has_seg else None
  p, qe, kd, lam = next(it), next(it), next(it), next(it)
  q_buf, k_buf, b_buf = next(it), next(it), next(it)
  seg_bufs = [next(it), next(it)] if has_seg else []
  b_hi, b_lo, kp_s, qe_s, kd_s, lam_s, p_s = (next(it) for _ in range(7))
  bars = next(it)
  bh, n = lax.axis_index("bh"), lax.axis_index("n")
  bi, hi = lax.div(bh, heads), lax.rem(bh, heads)
  c = q_buf.shape[1]
  tok = pl.ds(n * c, c)
  kcols = lambda j: pl.ds(j * BLOCK_K, BLOCK_K)
  wait_once = _start_copies([(seg.at[bi, n], buf) for buf in seg_bufs], bars)
  sources = [lambda j: q.at[bi, tok, hi, kcols(j)], lambda j: k.at[bi, tok, hi, kcols(j)],
             lambda j: cum_g.at[bi, tok, hi, kcols(j)]]
  wait_once()
  segs = _Segments(seg_bufs, c) if has_seg else None

  def body(j, views, p_CC):
    """P's share of key block j, e * Q, d * K and lambda of its columns."""
    levels = _Levels(views[2], b_hi, b_lo)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last block's stores out of qe_s, kd_s, lam_s
    qe_s[...] = (_load(views[0]) * _decay_in(_load(views[2]), segs)).astype(qe_s.dtype)
    d_CK, lam_K = _decay_out(_load(views[2]), segs)
    kd_s[...] = (_load(views[1]) * d_CK).astype(kd_s.dtype)
    lam_s[...] = lam_K
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qe_s, qe.at[bi, tok, hi, kcols(j)])
    plgpu.copy_smem_to_gmem(kd_s, kd.at[bi, tok, hi, kcols(j)])
    plgpu.copy_smem_to_gmem(lam_s, lam.at[bh, n, kcols(j)])
    diag_C = jnp.sum(_load(views[0]) * _load(views[1]), axis=1)
    p_CC = p_CC + jnp.where(levels.diagonal(), _spread(diag_C, (c, c), 0), 0.0)
    # q and k are read again at every level rather than held through the levels, both before the
    # commit's barrier: the next block's copy into these views follows the body with none.

    def level_step(level, p_CC):
      f_CK, odd_CK = levels.factor(level)
      qp_CK = jnp.where(odd_CK, _load(views[0]) * f_CK, 0.0).astype(kp_s.dtype)
      kp_s[...] = jnp.where(odd_CK, 0.0, _load(views[1]) * f_CK).astype(kp_s.dtype)
      plgpu.commit_smem()
      # Reading the product waited for its wgmma: kp_s is free for the next level.
      prod_CC = _accumulate(_zeros(c, c), (qp_CK, kp_s.transpose((1, 0))))
      return p_CC + jnp.where(levels.pairs(level), prod_CC, 0.0)

    p_CC = lax.fori_loop(0, levels.n_levels, level_step, p_CC)
    return p_CC

  p_CC = _walk(q.shape[-1] // BLOCK_K, sources, [q_buf, k_buf, b_buf], bars, body, _zeros(c, c), reverse=False)
  if has_seg:
    p_CC = jnp.where(segs.same_CC(), p_CC, 0.0)
  p_s[...] = (scale * p_CC).astype(p_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(p_s, p.at[bh, n])
  plgpu.wait_smem_to_gmem(0)


def _scores_layout(c, mm, has_seg):
  """`_perdim_scores_body`'s shared memory: per key block the q, k tiles and b (float32); the
  segment counts' two copies; b's bf16 split, K'_s, the e * Q and d * K tiles, lambda's share and P."""
  per_chunk = [((c, BLOCK_K), mm, True), ((c, BLOCK_K), mm, True), ((c, BLOCK_K), jnp.float32, False)]
  fixed = [((c,), jnp.float32, False)] * 2 * has_seg
  fixed += [((c, BLOCK_K), jnp.bfloat16, True)] * 2 + [((c, BLOCK_K), mm, True)] * 3
  fixed += [((BLOCK_K,), jnp.float32, False), ((c, c), mm, True)]
  return per_chunk, fixed, 2 * has_seg


def _perdim_forward_body(*refs, heads, scale, store_states):
  it = iter(refs)
  qe, kd, v, p, lam = (next(it) for _ in range(5))
  s0, o, s_final = next(it), next(it), next(it)
  states = next(it) if store_states else None
  qe_buf, kd_buf, v_buf, p_buf, lam_buf = (next(it) for _ in range(5))
  s_s, o_s, f32_s, bars = next(it), next(it), next(it), next(it)
  c = qe_buf.shape[1]
  bh, bi, hi, vcols, tok, sources = _walk_sources(heads, c, qe, kd, v, p, lam)
  _fetch_one(s0.at[bh, :, vcols], f32_s, bars.at[bars.shape[0] - 1])
  s_init = plgpu.load(f32_s, layout=WGMMA)

  def body(n, views, s):
    qe_v, kd_v, v_v, p_v, lam_v = views
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's stores out of s_s and o_s
    s_s[...] = s.astype(s_s.dtype)
    plgpu.commit_smem()
    if store_states:
      plgpu.copy_smem_to_gmem(s_s, states.at[bh, n, :, vcols])
    qs_CV = _matmul((c, BLOCK_V), (qe_v, s_s))
    o_s[...] = _accumulate(scale * qs_CV, (p_v, v_v)).astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o.at[bi, tok(n), hi, vcols])
    lam_K = plgpu.load(lam_v, layout=WGMMA.reduce(1))
    return _accumulate(_rows(lam_K, s), (kd_v.transpose((1, 0)), v_v))

  s = _walk(qe.shape[1] // c, sources, [qe_buf, kd_buf, v_buf, p_buf, lam_buf], bars, body, s_init, reverse=False)
  _stage_out(s, f32_s, s_final.at[bh, :, vcols])
  plgpu.wait_smem_to_gmem(0)


def _walk_sources(heads, c, qe, kd, x, p, lam):
  """A chunk walk's program (grid (B*H, V/64)) and `_walk`'s sources for it: chunk n's e * Q and
  d * K rows, x's rows in the program's value columns, P and lambda."""
  bh = lax.axis_index("bh")
  bi, hi = lax.div(bh, heads), lax.rem(bh, heads)
  vcols = pl.ds(lax.axis_index("v") * BLOCK_V, BLOCK_V)
  tok = lambda n: pl.ds(n * c, c)
  sources = [lambda n: qe.at[bi, tok(n), hi], lambda n: kd.at[bi, tok(n), hi],
             lambda n: x.at[bi, tok(n), hi, vcols], lambda n: p.at[bh, n], lambda n: lam.at[bh, n]]
  return bh, bi, hi, vcols, tok, sources


def _walk_layout(c, kd, mm, out_dtype):
  """A walk's shared memory (forward and reverse alike): per chunk e * Q, d * K, the V (dO) tile,
  P and lambda; the state's (H's) 16-bit copy, the O (dV) tile and a float32 staging buffer for
  the initial and final states; one more TMA barrier."""
  per_chunk = [((c, kd), mm, True), ((c, kd), mm, True), ((c, BLOCK_V), mm, True), ((c, c), mm, True),
               ((kd,), jnp.float32, False)]
  fixed = [((kd, BLOCK_V), mm, True), ((c, BLOCK_V), out_dtype, True), ((kd, BLOCK_V), jnp.float32, False)]
  return per_chunk, fixed, 1



def _check(q, v, g, chunk, what="forward", seg=None):
  why = input_problem(q, v, chunk, seg)
  if why is None and chunk & (chunk - 1):
    why = f"chunk_size must be a power of two (the score levels), got {chunk}"
  if why is None and g.shape != q.shape:
    why = f"only a per-dimension [B, T, H, K] = {q.shape} decay, got g of shape {g.shape}"
  if why:
    raise ValueError(f"Mosaic GPU fused per-dimension GLA {what}: {why}")


def chunk_cumsum(g, chunk):
  """[B, T, H, K] log decay (any float dtype) -> its float32 inclusive cumulative sum inside each
  chunk of T, [B, T, H, K]: the lower-triangular ones [C, C] in g's dtype times each chunk's rows
  (exact products, float32 sums; a 16-bit g's on the tensor cores). XLA's cumsum took 0.164 ms at
  8x2048x16x128 on the H100 (run 47), 2.5x its memory time."""
  b, t, h, kd = g.shape
  lower_CC = jnp.tril(jnp.ones((chunk, chunk), g.dtype))
  return jnp.einsum("ij,bnjhk->bnihk", lower_CC, g.reshape(b, t // chunk, chunk, h, kd),
                    precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32).reshape(g.shape)


def _kernel(body, out_type, layout_what, layout, grid, grid_names, interpret, *inputs, max_slots=2):
  scratch = scratch_within(f"Mosaic GPU fused per-dimension GLA {layout_what}", *layout, max_slots=max_slots)
  return plgpu.kernel(
      body, out_type=tuple(out_type), scratch_types=scratch, grid=grid,
      grid_names=grid_names, interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*inputs)


def scores(q, k, cum_g, seg, *, scale, chunk, interpret=False):
  """`_perdim_scores_body`: scale P [B*H, N, C, C], e * Q and d * K [B, T, H, K] (q's dtype) and
  lambda [B*H, N, K] float32. cum_g: `chunk_cumsum` of g; seg: [B, T] integer ids or None."""
  b, t, h, kd = q.shape
  n = t // chunk
  mm = q.dtype
  has_seg = seg is not None
  out_type = [jax.ShapeDtypeStruct((b * h, n, chunk, chunk), mm), jax.ShapeDtypeStruct(q.shape, mm),
              jax.ShapeDtypeStruct(q.shape, mm), jax.ShapeDtypeStruct((b * h, n, kd), jnp.float32)]
  inputs = [q, k, cum_g] + ([chunk_segments_BNC(seg, chunk)] if has_seg else [])
  body = _named(_perdim_scores_body, heads=h, scale=scale, has_seg=has_seg)
  return _kernel(body, out_type, "scores", _scores_layout(chunk, mm, has_seg), (b * h, n), ("bh", "n"),
                 interpret, *inputs, max_slots=CHUNK_PARALLEL_SLOTS)


def forward(q, k, v, g, s0, *, scale, chunk, store_states, interpret=False, seg=None):
  """O [B, T, H, V] in v's dtype, the final state [B*H, K, V] float32 and, if `store_states`, what
  the backward needs (else None): (the state entering every chunk [B*H, N, K, V] in q's dtype,
  `scores`' outputs, `chunk_cumsum` of g). q, k [B, T, H, K] and v [B, T, H, V] 16-bit with T a
  multiple of `chunk`; g [B, T, H, K] log decay (<= 0) in any float dtype; s0 [B*H, K, V] float32;
  seg [B, T] integer segment ids or None."""
  _check(q, v, g, chunk, seg=seg)
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n = t // chunk
  cum_g = chunk_cumsum(g, chunk)
  decayed = scores(q, k, cum_g, seg, scale=scale, chunk=chunk, interpret=interpret)
  p, qe, kdk, lam = decayed
  out_type = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32)]
  if store_states:
    out_type.append(jax.ShapeDtypeStruct((b * h, n, kd, vd), q.dtype))
  body = _named(_perdim_forward_body, heads=h, scale=scale, store_states=store_states)
  res = _kernel(body, out_type, "forward", _walk_layout(chunk, kd, q.dtype, v.dtype), (b * h, vd // BLOCK_V),
                ("bh", "v"), interpret, qe, kdk, v, p, lam, s0)
  return res[0], res[1], (res[2], decayed, cum_g) if store_states else None


# ---------------------------------------------------------------------------------------------
# Backward


def _perdim_state_grad_body(*refs, heads, scale):
  it = iter(refs)
  qe, kd, do, p, lam = (next(it) for _ in range(5))
  ds_final, dv, ds_out, ds0 = next(it), next(it), next(it), next(it)
  qe_buf, kd_buf, do_buf, p_buf, lam_buf = (next(it) for _ in range(5))
  h_s, dv_s, f32_s, bars = next(it), next(it), next(it), next(it)
  c = qe_buf.shape[1]
  bh, bi, hi, vcols, tok, sources = _walk_sources(heads, c, qe, kd, do, p, lam)
  _fetch_one(ds_final.at[bh, :, vcols], f32_s, bars.at[bars.shape[0] - 1])
  h_init = plgpu.load(f32_s, layout=WGMMA)

  def body(n, views, h):
    qe_v, kd_v, do_v, p_v, lam_v = views
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's stores out of h_s and dv_s
    h_s[...] = h.astype(h_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_s, ds_out.at[bh, n, :, vcols])
    kh_CV = _matmul((c, BLOCK_V), (kd_v, h_s))
    dv_s[...] = _accumulate(kh_CV, (p_v.transpose((1, 0)), do_v)).astype(dv_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dv_s, dv.at[bi, tok(n), hi, vcols])
    lam_K = plgpu.load(lam_v, layout=WGMMA.reduce(1))
    # The scale after the wgmma: one float32 [K, 64] accumulator holds both terms.
    return scale * _accumulate(_rows(lam_K / scale, h), (qe_v.transpose((1, 0)), do_v))

  h = _walk(qe.shape[1] // c, sources, [qe_buf, kd_buf, do_buf, p_buf, lam_buf], bars, body, h_init, reverse=True)
  _stage_out(h, f32_s, ds0.at[bh, :, vcols])
  plgpu.wait_smem_to_gmem(0)


def _perdim_chunk_grad_body(*refs, heads, scale, has_seg):
  it = iter(refs)
  q, k, v, do, cum_g = (next(it) for _ in range(5))
  seg = next(it) if has_seg else None
  s_in, ds_out, dq, dk, db = (next(it) for _ in range(5))
  do_buf, v_buf, s_buf, h_buf = next(it), next(it), next(it), next(it)
  q_s, k_s, b_s = next(it), next(it), next(it)
  seg_bufs = [next(it), next(it)] if has_seg else []
  db_last_s, dpm_s, qp_hi, qp_lo, kp_hi, kp_lo = (next(it) for _ in range(6))
  bars = next(it)
  c = q_s.shape[0]
  bh, n, _, bi, hi, kcols, tok = _gradient_program(heads, c)
  vcols = _value_block
  # The chunk's key block, decay and segment counts, once: their copies run beside the walk over
  # value blocks.
  once = [(q.at[bi, tok, hi, kcols], q_s), (k.at[bi, tok, hi, kcols], k_s), (cum_g.at[bi, tok, hi, kcols], b_s)]
  once += [(seg.at[bi, n], buf) for buf in seg_bufs]
  wait_once = _start_copies(once, bars)
  sources = [lambda j: do.at[bi, tok, hi, vcols(j)], lambda j: v.at[bi, tok, hi, vcols(j)],
             lambda j: s_in.at[bh, n, kcols, vcols(j)], lambda j: ds_out.at[bh, n, kcols, vcols(j)]]

  def body(j, views, sums):
    """Sums over the value blocks: dP = dO V^T, dO S^T, V H^T and H S^T."""
    do_v, v_v, s_v, h_v = views
    dp_CC, dos_CK, vh_CK, hs_KK = sums
    return (_accumulate(dp_CC, (do_v, v_v.transpose((1, 0)))),
            _accumulate(dos_CK, (do_v, s_v.transpose((1, 0)))),
            _accumulate(vh_CK, (v_v, h_v.transpose((1, 0)))),
            _accumulate(hs_KK, (h_v, s_v.transpose((1, 0)))))

  sums = (_zeros(c, c), _zeros(c, BLOCK_K), _zeros(c, BLOCK_K), _zeros(BLOCK_K, BLOCK_K))
  dp_CC, dos_CK, vh_CK, hs_KK = _walk(v.shape[-1] // BLOCK_V, sources, [do_buf, v_buf, s_buf, h_buf], bars, body,
                                      sums, reverse=False)
  wait_once()
  segs = _Segments(seg_bufs, c) if has_seg else None
  # The level loop below holds what is live across it through all of it: dQ, dK, dP (in 16 bits,
  # as the levels use it) and dP's diagonal. Everything V H^T and H S^T give is formed before it,
  # db's last-row sum staged in shared memory; q, k and b are read from shared memory where used.
  last_CK = _iota(dos_CK.shape, 0) == c - 1
  d_CK, lam_K = _decay_out(_load(b_s), segs)
  # dK's state term d * (V H^T) starts dK's accumulator. The levels add to even rows only, and the
  # last row is odd at every level, so dK's last row leaves the loop as d_C (V H^T)_C = (V H^T)_C.
  dk_CK = d_CK * vh_CK
  # db's last row: the column sum of K * (d * V H^T) over the other rows (the C-th term, and
  # -K * dK's on the last row, cancel exactly, so neither enters: under a strong decay they are
  # O(1) while db is e^-20 of that, and their float32 rounding was all of dg, relative error 46
  # against the scan) and lambda <H, S> per key row, H S^T's diagonal.
  hs_K = jnp.sum(jnp.where(_iota(hs_KK.shape, 0) == _iota(hs_KK.shape, 1), hs_KK, 0.0), axis=0)
  db_last_s[...] = jnp.sum(jnp.where(last_CK, 0.0, _load(k_s) * dk_CK), axis=0) + lam_K * hs_K
  dq_CK = scale * _decay_in(_load(b_s), segs) * dos_CK   # dQ's state term; the levels' shares add to it
  dp_CC = scale * dp_CC
  if has_seg:
    dp_CC = jnp.where(segs.same_CC(), dp_CC, 0.0)
  # b's split for the gathers goes through Q'_l's buffers (each level's gather has finished,
  # its result read, before Q'_l is stored): chunk 128 fits shared memory so.
  levels = _Levels(b_s, qp_hi, qp_lo, rewrite=True)
  # P's diagonal has no decay: dQ_i += dP_ii K_i, dK_i += dP_ii Q_i, after db, which leaves out the
  # q_i k_i dP_ii that Q * dQ and K * dK would both take.
  dpd_C = jnp.sum(jnp.where(levels.diagonal(), dp_CC, 0.0), axis=1)
  mm = dpm_s.dtype   # bf16
  dp_CC = dp_CC.astype(mm)   # each level's dP is stored in 16 bits: the rounding is the same here

  def level_step(level, grads):
    dq_CK, dk_CK = grads
    f_CK, odd_CK = levels.factor(level)
    # Level l's dP in 16 bits, K'_l and Q'_l as 16-bit hi + lo (the last level's products were
    # read: their wgmmas are done with the buffers). db = Q * dQ - K * dK pairs each term
    # q_i dP_ij k_j e^(b_i - b_j) of row i's dQ with its twin in row j's dK, and dg's reverse cumsum
    # adds them up: with K' and Q' rounded to 16 bits alone the twins round apart, and dg's error
    # against the scan tripled (bf16: 2.5e-3 -> 8e-3 at g around -20 a step; 1e-2 is the tolerance).
    dpm_s[...] = jnp.where(levels.pairs(level), dp_CC, jnp.zeros((), mm))
    _store_split(jnp.where(odd_CK, 0.0, _load(k_s) * f_CK), kp_hi, kp_lo)
    _store_split(jnp.where(odd_CK, _load(q_s) * f_CK, 0.0), qp_hi, qp_lo)
    plgpu.commit_smem()
    # dQ takes its share before dK's product is formed: one [C, 64] float32 product live, not two.
    dq_CK = dq_CK + jnp.where(odd_CK, f_CK * _matmul((c, BLOCK_K), (dpm_s, kp_hi), (dpm_s, kp_lo)), 0.0)
    dpt_CC = dpm_s.transpose((1, 0))
    dkp_CK = _matmul((c, BLOCK_K), (dpt_CC, qp_hi), (dpt_CC, qp_lo))
    return dq_CK, dk_CK + jnp.where(odd_CK, 0.0, f_CK * dkp_CK)

  dq_CK, dk_CK = lax.fori_loop(0, levels.n_levels, level_step, (dq_CK, dk_CK))
  q_CK, k_CK = _load(q_s), _load(k_s)
  last_CK = _iota(k_CK.shape, 0) == c - 1   # made again rather than held through the loop
  db_last_CK = _spread(plgpu.load(db_last_s, layout=WGMMA.reduce(0)), k_CK.shape, 1)
  # q_s, k_s, b_s were last read into registers above: they take dq, dk, db on their way out.
  b_s[...] = q_CK * dq_CK + jnp.where(last_CK, db_last_CK, -k_CK * dk_CK)
  q_s[...] = (dq_CK + _rows(dpd_C, k_CK)).astype(q_s.dtype)
  k_s[...] = (dk_CK + _rows(dpd_C, q_CK)).astype(k_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_s, dq.at[bi, tok, hi, kcols])
  plgpu.copy_smem_to_gmem(k_s, dk.at[bi, tok, hi, kcols])
  plgpu.copy_smem_to_gmem(b_s, db.at[bi, tok, hi, kcols])
  plgpu.wait_smem_to_gmem(0)


def _chunk_grad_layout(c, mm, has_seg):
  """`chunk_grads`' shared memory: per value block the dO, V tiles and the S, H blocks; the chunk's
  q and k key block (then dq and dk), b (float32; then db) and the segment counts' two copies;
  db's last row's sum [64] (float32); level l's dP in bf16 and K'_l, Q'_l as bf16 hi + lo (Q'_l's
  buffers take b's split for the gathers first; bf16 whatever the inputs' dtype: float16 would
  hold b only down to -65504); one TMA barrier for each once-copied input."""
  per_chunk = [((c, BLOCK_V), mm, True), ((c, BLOCK_V), mm, True), ((BLOCK_K, BLOCK_V), mm, True),
               ((BLOCK_K, BLOCK_V), mm, True)]
  fixed = [((c, BLOCK_K), mm, True)] * 2 + [((c, BLOCK_K), jnp.float32, False)]
  fixed += [((c,), jnp.float32, False)] * 2 * has_seg + [((BLOCK_K,), jnp.float32, False)]
  fixed += [((c, c), jnp.bfloat16, True)] + [((c, BLOCK_K), jnp.bfloat16, True)] * 4
  return per_chunk, fixed, 3 + 2 * has_seg


def state_grads(decayed, do, ds_final, *, scale, chunk, interpret=False):
  """The reverse pass: dv [B, T, H, V] in do's dtype, H = dL/dS of the state leaving every chunk
  [B*H, N, K, V] in e * Q's dtype and the initial-state gradient [B*H, K, V] float32. decayed:
  `scores`' outputs; do [B, T, H, V] in q's dtype; ds_final [B*H, K, V] float32."""
  p, qe, kdk, lam = decayed
  b, t, h, kd = qe.shape
  vd = do.shape[-1]
  mm = qe.dtype
  out_type = (jax.ShapeDtypeStruct(do.shape, do.dtype), jax.ShapeDtypeStruct((b * h, t // chunk, kd, vd), mm),
              jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32))
  body = _named(_perdim_state_grad_body, heads=h, scale=scale)
  return _kernel(body, out_type, "backward", _walk_layout(chunk, kd, mm, do.dtype), (b * h, vd // BLOCK_V),
                 ("bh", "v"), interpret, qe, kdk, do, p, lam, ds_final)


def chunk_grads(q, k, v, cum_g, do, states, ds_out, *, scale, chunk, interpret=False, seg=None):
  """dq, dk [B, T, H, K] in q's dtype and db [B, T, H, K] float32 (dg is its in-chunk reverse
  cumulative sum), every chunk in parallel (one warpgroup per (batch*head, chunk, 64-wide key
  block), walking the value blocks) from the state entering it (`forward`'s `store_states`) and
  H of `state_grads`, both [B*H, N, K, V] in q's dtype. cum_g: `chunk_cumsum` of g; seg: [B, T]
  integer segment ids or None."""
  b, t, h, kd = q.shape
  n = t // chunk
  has_seg = seg is not None
  mm = q.dtype
  out_type = [jax.ShapeDtypeStruct(q.shape, mm), jax.ShapeDtypeStruct(k.shape, mm),
              jax.ShapeDtypeStruct(q.shape, jnp.float32)]
  inputs = [q, k, v, do, cum_g] + ([chunk_segments_BNC(seg, chunk)] if has_seg else []) + [states, ds_out]
  body = _named(_perdim_chunk_grad_body, heads=h, scale=scale, has_seg=has_seg)
  return _kernel(body, out_type, "backward", _chunk_grad_layout(chunk, mm, has_seg), (b * h, n, kd // BLOCK_K),
                 ("bh", "n", "kb"), interpret, *inputs, max_slots=CHUNK_PARALLEL_SLOTS)


def chunk_reverse_cumsum(x, chunk, dtype):
  """[B, T, H, K] float32 -> its reverse cumulative sum inside each chunk of T, in `dtype`. (Formed
  in the chunk-gradient kernel as U db on the tensor cores, dg came out NaN on the H200 at
  1x2048x1x64x2048 while interpret mode gave none: run 48, experiments/NOTES.md.)"""
  b, t, h, kd = x.shape
  x = x.reshape(b, t // chunk, chunk, h, kd)
  return jnp.flip(jnp.cumsum(jnp.flip(x, 2), axis=2), 2).reshape(b, t, h, kd).astype(dtype)


def backward(q, k, v, g, saved, do, ds_final, *, scale, chunk, interpret=False, seg=None):
  """(dq, dk, dv in the inputs' dtype, dg [B, T, H, K] in g's dtype, ds0 [B*H, K, V] float32).
  saved: what `forward(store_states=True)` returned for the backward; the other arguments as
  `forward`'s, do [B, T, H, V] in v's dtype, ds_final [B*H, K, V] float32."""
  _check(q, do, g, chunk, "backward", seg)
  states, decayed, cum_g = saved
  dv, ds_out, ds0 = state_grads(decayed, do, ds_final, scale=scale, chunk=chunk, interpret=interpret)
  dq, dk, db = chunk_grads(q, k, v, cum_g, do, states, ds_out, scale=scale, chunk=chunk, interpret=interpret,
                           seg=seg)
  return dq, dk, dv, chunk_reverse_cumsum(db, chunk, g.dtype), ds0


def fused_unsupported(chunk, kd, dtype=jnp.bfloat16):
  """Why `fused_gla_perdim` (its four kernels, with segment ids: their largest shared memory) cannot
  take a chunk and key size, or None; `supports` covers the rest (dtype, multiples of 64)."""
  if chunk & (chunk - 1):
    return f"chunk_size must be a power of two (the score levels), got {chunk}"
  layouts = {"scores": _scores_layout(chunk, dtype, True), "forward": _walk_layout(chunk, kd, dtype, dtype),
             "backward": _chunk_grad_layout(chunk, dtype, True)}
  return smem_overflow({f"Mosaic GPU fused per-dimension GLA {what}": layout for what, layout in layouts.items()},
                       f" at K {kd}, chunk {chunk}")


# g [B, T, H, K] in any float dtype; dg comes back in it.
fused_gla_perdim = make_fused_gla(forward, backward)
