"""Pallas kernels (GPU, Triton lowering) for the whole chunked delta rule, chunk-parallel work
included; GLA runs through the same kernels without the WY terms (beta None: X = V, T = I, so
dV = dX and every dA / dbeta term drops out). GLA with a per-dimension decay (b, e, d: [C, K];
lambda: [K]) cannot form Gamma: `_scores_kernel` builds P and stores e * Q, d * K and lambda,
which the passes then read in place of Q, K and the decay; `_scores_grad_kernel` takes P's
gradient back to dq, dk and db.

Unlike `state_pass_triton`, which runs only the two sequential passes over XLA-built terms, these
kernels read the raw inputs in their [B, T, H, *] layout (T padded to a multiple of the chunk C)
and keep every per-chunk [C, C] / [C, K] intermediate in registers, except what the forward stores
for the backward (T of the solve, W, X, the states). Forward and backward, for a
chunk with in-chunk cumulative log decay b (zero when ungated), e_i = exp(b_i), d_i =
exp(b_C - b_i), lambda = exp(b_C), Gamma_ij = exp(b_i - b_j) on the causal same-segment support
(segment masks zero e, d, lambda and Gamma exactly as `chunking.chunk_masks` does):

    A = strict_lower(beta_i (K K^T)_ij Gamma_ij),  T = (I + A)^-1
    W = T (beta e * K),  U = T (beta * V),  X = U - W S           (S: the state entering the chunk)
    P = scale (Q K^T) * Gamma                                      (diagonal included)
    O = scale e * (Q S) + P X,   S' = lambda S + (d * K)^T X

Kernels (programs over (B*H, chunk[, key block]) are chunk-parallel, over (B*H, value block)
sequential):
  `_wy_kernel`         (B*H, N):  W, U into [B*H, N, C, *] buffers (and T, for the backward).
  `_forward_kernel`    (B*H, V/BV): the state pass: X, S' (and, in inference, O) per chunk;
                       for the backward it stores the state entering every chunk and X (in the
                       inputs' dtype, which the forward's matmuls already rounded them to).
                       When it splits the output off (SPLIT_OUTPUT; training forward only),
  `_output_kernel`     (B*H, N, V/BV) computes O from the stored state and X of every chunk.
  `_state_grad_kernel` (B*H, V/BV): the reverse pass, H = dL/dS' of each chunk:
                       dX = P^T dO + d * (K H) (stored),  dS = lambda H + scale (e * Q)^T dO - W^T dX.
  `_dqk_kernel`        (B*H, N, K/BK): dQ, the dK terms outside the solve, dW = -dX S^T and the
                       decay-gradient terms, from X, dX, S and H.
  `_wy_grad_kernel`    (B*H, N):  back through the solve (T from the forward): dV, dbeta, the
                       rest of dK and of db.
  `_scores_kernel`     (B*H, N):  per-dimension decay: P, e * Q, d * K, lambda (before the passes).
  `_scores_grad_kernel` (B*H, N, K/BK): per-dimension decay: dq, dk, db through P from the masked
                       dP = scale dO X^T that `_dqk_kernel` stores (in place of the solve's kernel).

The solve: T = (I + A)^-1 with A strictly lower. D, the 16 x 16 diagonal blocks of A, are
inverted by forward substitution on register tiles (row r of all four blocks at once: a masked
row reduction picks the rows' coefficients, a masked column reduction applies them; no dynamic
register indexing), then with M = (I + D)^-1 L (L = A - D, strictly block-lower, so M^4 = 0):
T = (I - M + M^2 - M^3) (I + D)^-1, three matmuls in Horner form.

The per-dimension scores P_ts = sum_d q_td k_sd exp(b_td - b_sd) (s <= t) do not factor into
(q e^b)(k e^-b)^T without overflow: `_scores_kernel` and `_scores_grad_kernel` take them in blocks
of 16 rows, the rows before a block by one matmul (q e^(b - r))(k e^(r - b))^T against a reference
r = b of the row before it (factors <= 1, b being non-increasing), the 16 x 16 diagonal block
exactly, one column a loop step. With SCORES_DIAGONAL_MATMUL the matmul also takes the block's own
rows wherever the range R = max |b - r| over them and the program's key columns is at most
DIAGONAL_MATMUL_MAX_RANGE (factors within e^(+-R)), and masks them to s <= t; per block at run
time (lax.cond: scf.if), the column loop elsewhere.

Backward of one chunk (hand-derived; checked against `jax.vjp` of `chunked.chunk_forward`):
    dX  = P^T dO + d * (K H)                     R = T^T dX
    dV  = beta * R                               R_K = T^T dW = -R S^T      (dW = -dX S^T)
    dA  = -T^T dT T^T = -(R U^T + R_K W^T) = -R X^T, kept on A's support
    dP  = dO X^T;   G = beta_i Gamma_ij dA_ij
    dQ  = scale (dP * Gamma) K + scale e * (dO S^T)
    dK  = scale (dP * Gamma)^T Q + d * (X H^T) + beta e * R_K + G K + G^T K
    dbeta = rowsum(R * V) + e * rowsum(R_K * K) + rowsum(dA * (K K^T) * Gamma)
    db  = rowsum(Dg) - colsum(Dg) + e * rowsum(scale (dO S^T) * Q) - d * rowsum((X H^T) * K)
          + beta e * rowsum(R_K * K) + [i = C] (sum_j d_j rowsum((X H^T) * K)_j + lambda <H, S>),
          with Dg = dP * P + dA * A (the log-Gamma gradient); dg = reverse cumsum of db.
The gradient of the incoming state comes from the reverse pass. Each db term is a sum over key
columns, so `_dqk_kernel`'s key blocks and `_wy_grad_kernel` each add their share.

Matmul operands: bf16 inputs give bf16 operands where both are inputs (exact products), in the
state passes (as `state_pass_triton`) and, with BF16_GRAD_OPERANDS (the default), in the
gradient kernels, whose stored intermediates (dL/dS, dX, dW, T) are then bf16 too; without it
those stay float32 and use TF32 (precision DEFAULT), as do the float32 products of the forward's
solve (T, W, U in `_wy_kernel`). float32 inputs use three-pass TF32
everywhere (`_precision`). Accumulation is always float32.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat

# (num_warps, num_stages) per kernel: the knobs to tune on the device (gpu_check_fused.py --params).
# 4 warps for the gradient kernels: measured on the H200 (run 7: 8x2048x16x128 delta rule fwd+bwd
# 2.06-2.08 ms against 2.46 at 8 warps, two programs per SM instead of one despite more spills);
# 2 warps lost 4-5x (run 10), as did 2 warps for `_wy_kernel` (2.11 against 1.72 ms).
WY_PARAMS = (4, 1)
FORWARD_PARAMS = (4, 1)
STATE_GRAD_PARAMS = (4, 1)
DQK_PARAMS = (4, 1)
WY_GRAD_PARAMS = (4, 1)
OUTPUT_PARAMS = (4, 1)
SCORES_PARAMS = (4, 1)
# 2 stages for the scores gradient's loops over earlier/later blocks: H200 run 25, per-dim GLA
# 8x2048x16x128 fwd+bwd 3.52 / 3.49 ms against 3.54 / 3.61 at 1 stage (interleaved processes).
SCORES_GRAD_PARAMS = (4, 2)
CUMSUM_PARAMS = (4, 1)
GRAD_BLOCK_K = 64     # key columns per program of `_dqk_kernel` (and per step of `_wy_grad_kernel`)
GRAD_BLOCK_V = 64     # value columns per step of both gradient kernels' loops
STATE_BLOCK_V = 64    # value columns per program of the two sequential passes
SOLVE_BLOCK = 16
SCORE_BLOCK = 16      # rows of the sub-blocks of the per-dimension-decay scores (`_scores_kernel`)
# Key columns per `_scores_kernel` program (None, or K or more: all K). Below K each program sums
# its columns' share of P in float32 and XLA adds the K/BK shares: fewer registers per program
# (ptxas, Triton 3.6, K 128: 255 with 88 bytes spilled, 236 at 64, 127 at 32) for a float32
# [K/BK, B*H, N, C, C] round trip through memory. Triton's dot needs 16 or more on a GPU (the
# interpret-mode tests also take 8). 64: H200 run 19, per-dimension GLA 8x2048x16x128 fwd+bwd
# 3.51-3.57 ms against 3.65 (all K) and 3.79 (32), with exp2 and the per-block scores gradient.
SCORES_BLOCK_K = 64
# Columns of the score kernels' diagonal blocks per loop iteration, in straight-line code. One:
# H200 run 13, per-dimension GLA 8x2048x16x128 fwd+bwd 4.12 ms, 4.74 at 4 (`_scores_kernel` alone
# 1.16 against 1.94 ms: more registers, fewer programs per SM, for loads issued ahead); 16
# (SCORE_BLOCK) unrolls the loop, at minutes of Triton compile time.
SCORE_UNROLL = 1
# The score kernels' diagonal blocks by the matmul of the earlier rows, its reach extended over the
# block's own rows, wherever the block's decay range R allows (DIAGONAL_MATMUL_MAX_RANGE; chosen per
# block at run time), else by the exact column loop above: both kernels are latency-bound in their
# 16-step diagonal loops (H100 profile, per-dimension GLA 8x2048x16x128 fwd+bwd 3.0 ms, of which
# `_scores_kernel` 0.78 and `_scores_grad_kernel` 1.04; halving the loops' exp2 work bought nothing).
# H100 run 36 (kernels/h100/run36.sh, interleaved, one process), per-dimension GLA 8x2048x16x128 bf16:
# fwd+bwd 2.14 / 2.14 ms against 3.11 / 3.03 with the loops alone, fwd 0.76 / 0.75 against 1.22 / 1.18.
SCORES_DIAGONAL_MATMUL = True
# The largest R (natural log) for a diagonal block's matmul: R = max over its rows t and the program's
# key columns d of |b_td - r_d|, r = b of the row before the block (block 0: its first row; b being
# non-increasing, the block's last row, dk's reference in `_scores_grad_kernel`, is within R of its
# rows too), bounds every factor q e^(b - r) and k e^(r - b) of the block's rows within e^(+-R) and
# every product, the entries masked off after the matmul included, within e^(+-2R): e^(+-80) at 40,
# inside float32's and bf16's range (e^(+-88)) with room for q k, and normal, so each kept term
# q k e^(b_t - b_s) keeps the relative error of its operands' rounding (for bf16 inputs the factors'
# bf16 rounding, as in the blocks of earlier rows). Both assume g <= 0 (b non-increasing), as the
# earlier rows' matmul does. float16 inputs keep the loop in `_scores_kernel` (its operands would
# overflow past e^11); `_scores_grad_kernel`'s matmuls are float32. A strong decay (g of -20 a
# step) falls past the bound within a block: the loop then.
DIAGONAL_MATMUL_MAX_RANGE = 40.0
# Key columns per `_scores_grad_kernel` program (a divisor of K, 16 or more).
SCORES_GRAD_BLOCK_K = 64
# A per-dimension decay's in-chunk cumulative sums (forward: of g, backward: of db) in
# `_cumsum_kernel` rather than XLA, whose reduce-window cumsum over the chunk axis took 0.23 ms
# forward (three fusions) and 0.16 ms backward of the 3.31 ms of per-dim GLA's fwd+bwd at
# 8x2048x16x128 (H200 run 24 profile).
PALLAS_CUMSUM = True
CUMSUM_BLOCK_K = 128
_LOG2_E = 1.4426950408889634
# In a training step's forward, walk only the states and compute the outputs in the
# chunk-parallel `_output_kernel` from the stored states and X, as flash-linear-attention does:
# the sequential pass drops its 3 output-only matmuls a chunk (Q K^T, Q S, P X). Measured on the
# H200 (delta rule fwd+bwd, split against fused): 1x32768x16x128 7.10 against 7.69 ms (32
# sequential programs on 132 SMs), 2x8192 2.39 against 2.57, 8x2048 1.79 against 1.86 (noise
# about 3%); scalar-decay GLA 5.95 / 6.79, 1.82 / 1.99, 1.18 / 1.29. Inference (no stored states)
# keeps the output fused.
SPLIT_OUTPUT = True
# With bf16 inputs, the backward's intermediates (dL/dS of every chunk, dX, dW and T) in bf16 and
# every matmul of the gradient kernels on bf16 operands (float32 accumulation), as
# flash-linear-attention's backward does. False keeps them float32 with TF32 matmuls, at half the
# tensor-core rate and twice the registers (H200 run 7, 8-warp gradient kernels, 8x2048x16x128
# fwd+bwd: delta rule 2.46 against 2.93 ms, scalar-decay GLA 1.41 against 1.93), for about 15% less
# gradient error against the float32 scan. No effect on float32 inputs.
BF16_GRAD_OPERANDS = True


def _f32(x):
  return x.astype(jnp.float32)


def _masked_exp2(x, mask):
  """`chunking.masked_exp` inside a kernel: exp(x) where mask, else 0, as exp2(x log2 e) (jnp.exp
  lowers to libdevice expf, several instructions around one ex2). Scaling the difference x keeps
  its float32 accuracy under a strong decay."""
  return jnp.exp2(jnp.where(mask, x * _LOG2_E, -jnp.inf))


_PRECISIONS = {False: None, "highest": jax.lax.Precision.HIGHEST,
               "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3}


def _precision(dtype, interpret):
  """Matmul precision of the kernels for inputs of `dtype`: the default (bf16 operands or TF32)
  for bf16 inputs; for float32 inputs three-pass TF32 on the GPU (float32-level error on the
  tensor cores: precision HIGHEST lowers to scalar FMA loops, megabytes of PTX that take minutes
  to compile) and HIGHEST in interpret mode (the CPU has no TF32x3)."""
  if dtype != jnp.float32:
    return False
  return "highest" if interpret else "tf32x3"


def _mm(a, b, precise, ta=False, tb=False):
  """a @ b (a^T if ta, b^T if tb), float32 accumulation; `precise` a key of _PRECISIONS."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=_PRECISIONS[precise])


def _mask(pred):
  """pred as 1.0 / 0.0. Not jnp.where(pred, 1.0, 0.0): with a scalar pred the Triton lowering
  (jax 0.10) keeps that select's result boolean and then fails on `mask * x`."""
  return jax.lax.select(pred, jnp.ones(pred.shape, jnp.float32), jnp.zeros(pred.shape, jnp.float32))


def _iota(c):
  return jax.lax.broadcasted_iota(jnp.int32, (c, c), 0), jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)


class Geometry(NamedTuple):
  """One chunk's decays and masks (float32): see the module docstring."""
  causal: jax.Array            # [C, C] bool: j <= i, same segment
  gamma: jax.Array             # [C, C]: exp(b_i - b_j) on `causal`, else 0
  e: Optional[jax.Array]       # [C] or None (all ones)
  d: Optional[jax.Array]       # [C] or None (all ones)
  lam: Optional[jax.Array]     # scalar or None (one)


class DimGeometry(NamedTuple):
  """A per-dimension decay's factors of one chunk (float32; segment masks applied as in Geometry)."""
  e: jax.Array      # [C, K']: exp(b_i)
  d: jax.Array      # [C, K']: exp(b_C - b_i)
  lam: jax.Array    # [K']: exp(b_C)


class PreDecayed(NamedTuple):
  """A per-dimension decay in the sequential passes and `_output_kernel`: `_scores_kernel` has
  already stored e * Q and d * K (segment masks included), which the passes read in place of Q and
  K, and the intra-chunk scores P; left for the pass is the state's decay lambda [K]."""
  lam: jax.Array


def _geometry(c, b, b_last, seg, prev, last):
  """b: [C] float32 in-chunk cumulative log decay (b_last its last entry, a scalar) or None; seg:
  [C] int32 ids or None, with `prev` (the id of the incoming state) and `last` (the id of the
  chunk's last token) scalars."""
  rows, cols = _iota(c)
  causal = rows >= cols
  e = d = lam = None
  if seg is not None:
    causal = causal & (seg[:, None] == seg[None, :])
    e = _mask(seg == prev)
    d = _mask(seg == last)
    lam = _mask(last == prev)
  if b is None:
    return Geometry(causal, _mask(causal), e, d, lam)
  gamma = jnp.exp(jnp.where(causal, b[:, None] - b[None, :], -jnp.inf))
  scaled = lambda mask, x: jnp.exp(x) if mask is None else mask * jnp.exp(x)
  return Geometry(causal, gamma, scaled(e, b), scaled(d, b_last - b), scaled(lam, b_last))


def _rows(x, vec):
  """diag(vec) x; vec None means ones."""
  return x if vec is None else x * vec[:, None]


def _vec(vec, c):
  return jnp.ones((c,), jnp.float32) if vec is None else vec


def unit_lower_inverse(a, precise, block=SOLVE_BLOCK):
  """(I + a)^-1 for a strictly lower triangular [C, C] float32 tile (see the module docstring)."""
  c = a.shape[0]
  blk = block if c % block == 0 else c
  nb = c // blk
  rows, cols = _iota(c)
  same = (rows // blk) == (cols // blk)
  eye = _mask(rows == cols)
  d_t = jnp.where(same, a, 0.0).T           # d_t[j, i] = D[i, j]
  row_in_blk, col_in_blk = rows % blk, cols % blk
  inv = eye
  for r in range(1, blk):
    coef = jnp.sum(jnp.where(col_in_blk == r, d_t, 0.0), axis=1)   # [C]: D[i_m, j] for j in block m
    y = jnp.sum(coef[:, None] * inv, axis=0)                         # row i_m of D inv, per block
    inv = jnp.where((row_in_blk == r) & same, eye - y[None, :], inv)
  if nb == 1:
    return inv
  m = _mm(inv, jnp.where(same, 0.0, a), precise)
  t = eye - m
  for _ in range(nb - 2):
    t = eye - _mm(m, t, precise)
  return _mm(t, inv, precise)


class _Loader:
  """Reads one chunk of the [B, T, H, *] inputs; `bh` is the flat batch*head program index."""

  def __init__(self, bh, heads, c):
    self.bh, self.b, self.h, self.c = bh, bh // heads, bh % heads, c

  def tok(self, ref, n, cols=None):
    """[C, *] tile of a [B, T, H, *] array (columns `cols`, a pl.ds, or all)."""
    return self.sub_rows(ref, n, 0, self.c, cols)

  def scalar(self, ref, n):
    """[C] of a [B, T, H] array."""
    return ref[self.b, pl.ds(n * self.c, self.c), self.h]

  def segments(self, seg_ref, n):
    """The chunk's ids [C], the id of its incoming state and the id of its last token."""
    start = n * self.c
    return (seg_ref[self.b, pl.ds(start, self.c)], seg_ref[self.b, jnp.maximum(start - 1, 0)],
            seg_ref[self.b, start + self.c - 1])

  def geometry(self, cum_g_ref, seg_ref, n):
    """cum_g_ref: the in-chunk cumulative scalar log decay [B, T, H] (`chunk_cumsum`) or None."""
    b = b_last = None
    if cum_g_ref is not None:
      b = self.scalar(cum_g_ref, n)
      b_last = cum_g_ref[self.b, n * self.c + self.c - 1, self.h]
    if seg_ref is None:
      return _geometry(self.c, b, b_last, None, None, None)
    return _geometry(self.c, b, b_last, *self.segments(seg_ref, n))

  def dim_geometry(self, cum_g_ref, seg_ref, n, cols=None):
    """The per-dimension decay's factors of chunk n (key columns `cols`, a pl.ds, or all);
    cum_g_ref: the in-chunk cumulative log decay [B, T, H, K]."""
    last_t = n * self.c + self.c - 1
    b = self.tok(cum_g_ref, n, cols)
    b_last = cum_g_ref[self.b, last_t, self.h, :] if cols is None else cum_g_ref[self.b, last_t, self.h, cols]
    e, d, lam = jnp.exp(b), jnp.exp(b_last[None, :] - b), jnp.exp(b_last)
    if seg_ref is not None:
      seg, prev, last = self.segments(seg_ref, n)
      e, d, lam = e * _mask(seg == prev)[:, None], d * _mask(seg == last)[:, None], lam * _mask(last == prev)
    return DimGeometry(e, d, lam)

  def store_tok(self, ref, n, x, cols=None):
    self.store_sub_rows(ref, n, 0, self.c, x, cols)

  def store_scalar(self, ref, n, x):
    ref[self.b, pl.ds(n * self.c, self.c), self.h] = x.astype(ref.dtype)

  def sub_rows(self, ref, n, i, sub, cols=None):
    """[sub, *] tile of a [B, T, H, *] array: rows i*sub... of chunk n, columns `cols` (a pl.ds, or all)."""
    t = pl.ds(n * self.c + i * sub, sub)
    return ref[self.b, t, self.h, :] if cols is None else ref[self.b, t, self.h, cols]

  def store_sub_rows(self, ref, n, i, sub, x, cols=None):
    """Stores x into rows i*sub... of chunk n (columns `cols`, a pl.ds, or all)."""
    t = pl.ds(n * self.c + i * sub, sub)
    if cols is None:
      ref[self.b, t, self.h, :] = x.astype(ref.dtype)
    else:
      ref[self.b, t, self.h, cols] = x.astype(ref.dtype)

  def row(self, ref, n, j, cols):
    """[*] of a [B, T, H, *] array at row j of chunk n (j may be traced)."""
    return ref[self.b, n * self.c + j, self.h, cols]


def _split_refs(refs, names, flags):
  """Unpacks positional refs into a dict; names whose flag is False get None."""
  out, it = {}, iter(refs)
  for name in names:
    out[name] = next(it) if flags.get(name, True) else None
  rest = list(it)
  assert not rest, f"{len(rest)} refs left over"
  return out


def _block_v(vd, block=64):
  return block if vd % block == 0 else vd


# ---------------------------------------------------------------------------------------------
# Kernels


def _a_terms(ld, r, n, precise):
  """The geometry of chunk n, k (the inputs' dtype), beta, K K^T and A."""
  geo = ld.geometry(r["cum_g"], r["seg"], n)
  k = ld.tok(r["k"], n)
  beta = _f32(ld.scalar(r["beta"], n))
  rows, cols = _iota(k.shape[0])
  kkt = _mm(k, k, precise, tb=True)
  a = jnp.where(rows > cols, beta[:, None] * kkt * geo.gamma, 0.0)
  return geo, k, beta, kkt, a


def _wy_kernel(*refs, heads, c, block_v, has_g, has_seg, want_t, precise):
  r = _split_refs(refs, ("k", "v", "beta", "cum_g", "seg", "w", "u", "t"),
                  {"cum_g": has_g, "seg": has_seg, "t": want_t})
  bh, n = pl.program_id(0), pl.program_id(1)
  ld = _Loader(bh, heads, c)
  geo, k, beta, _, a = _a_terms(ld, r, n, precise)
  t = unit_lower_inverse(a, precise)
  if want_t:
    r["t"][bh, n] = t.astype(r["t"].dtype)
  r["w"][bh, n] = _mm(t, _rows(_f32(k), beta * _vec(geo.e, c)), precise).astype(r["w"].dtype)
  vd = r["u"].shape[-1]
  for j in range(vd // block_v):
    cols = pl.ds(j * block_v, block_v)
    v = _f32(ld.tok(r["v"], n, cols))
    r["u"][bh, n, :, cols] = _mm(t, _rows(v, beta), precise).astype(r["u"].dtype)


def _chunk_output(q, k, p, s_mm, x_mm, geo, scale, precise):
  """O of one chunk (float32): scale (e * (Q S) + P X), S and X in q's dtype. Shared by the fused
  and the split forward, so both give the same output from the same operands. Per-dimension decay
  (`geo` PreDecayed, q = e * Q): scale (q S + P X), P of `_scores_kernel`."""
  if isinstance(geo, PreDecayed):
    return scale * (_mm(q, s_mm, precise) + _mm(p, x_mm, precise))
  p = _mm(q, k, precise, tb=True) * geo.gamma
  return scale * (_rows(_mm(q, s_mm, precise), geo.e) + _mm(p.astype(q.dtype), x_mm, precise))


def _decayed_keys(k, x, geo, mm):
  """(keys, values) whose product K'^T X' is the chunk's state update (d * K)^T X, cast to mm:
  a scalar decay scales X's rows; a per-dimension one came in k = d * K."""
  if isinstance(geo, PreDecayed):
    return k, x.astype(mm)
  return k, x.astype(mm) if geo.d is None else _rows(_f32(x), geo.d).astype(mm)


def _decay_state(s, geo):
  """lambda S: lambda a scalar or, per dimension, one factor per key row of S."""
  if isinstance(geo, PreDecayed):
    return geo.lam[:, None] * s
  return s if geo.lam is None else geo.lam * s


def _chunk_geometry(ld, r, n, per_dim):
  """Per dimension, r["cum_g"] holds the chunks' lambda [B*H, N, K] (`scores`)."""
  return PreDecayed(r["cum_g"][ld.bh, n]) if per_dim else ld.geometry(r["cum_g"], r["seg"], n)


def _forward_kernel(*refs, heads, c, n_chunks, block_v, scale, wy, has_g, has_seg, per_dim, store_states,
                    with_output, precise):
  """The state pass; O too if `with_output` (else `_output_kernel` computes it from s_in and X)."""
  r = _split_refs(refs, ("q", "k", "v", "w", "u", "cum_g", "seg", "p", "s0", "o", "s_final", "s_in", "x"),
                  {"q": with_output, "v": not wy, "w": wy, "u": wy, "cum_g": has_g, "seg": has_seg,
                   "p": with_output and per_dim, "o": with_output, "s_in": store_states,
                   "x": store_states and wy})
  bh, vb = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(vb * block_v, block_v)
  ld = _Loader(bh, heads, c)
  mm = (r["q"] if with_output else r["s_in"]).dtype    # q's dtype (s_in is stored in it)

  def step(n, s):
    if store_states:
      r["s_in"][bh, n, :, cols] = s.astype(r["s_in"].dtype)
    geo = _chunk_geometry(ld, r, n, per_dim)
    k = ld.tok(r["k"], n)
    s_mm = s.astype(mm)
    if wy:
      x = _f32(r["u"][bh, n, :, cols]) - _mm(r["w"][bh, n], s_mm, precise)
      x_mm = x.astype(mm)
      if store_states:
        ld.store_tok(r["x"], n, x_mm, cols)
    else:
      x_mm = ld.tok(r["v"], n, cols)
      x = x_mm
    if with_output:
      p = r["p"][bh, n] if per_dim else None
      ld.store_tok(r["o"], n, _chunk_output(ld.tok(r["q"], n), k, p, s_mm, x_mm, geo, scale, precise), cols)
    kd, xd = _decayed_keys(k, x, geo, mm)
    return _decay_state(s, geo) + _mm(kd, xd, precise, ta=True)

  r["s_final"][bh, :, cols] = jax.lax.fori_loop(0, n_chunks, step, r["s0"][bh, :, cols])


def _output_kernel(*refs, heads, c, block_v, scale, has_g, has_seg, per_dim, precise):
  """O of one chunk and one value block (program (B*H, N, V/BV)) from the state entering the chunk
  and X (GLA: V), both as the forward's state pass rounded them for its own matmuls."""
  r = _split_refs(refs, ("q", "k", "x", "cum_g", "seg", "p", "s_in", "o"),
                  {"cum_g": has_g, "seg": has_seg, "p": per_dim})
  bh, n, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(vb * block_v, block_v)
  ld = _Loader(bh, heads, c)
  geo = _chunk_geometry(ld, r, n, per_dim)
  o = _chunk_output(ld.tok(r["q"], n), ld.tok(r["k"], n), r["p"][bh, n] if per_dim else None,
                    r["s_in"][bh, n, :, cols], ld.tok(r["x"], n, cols), geo, scale, precise)
  ld.store_tok(r["o"], n, o, cols)


def _state_grad_kernel(*refs, heads, c, n_chunks, block_v, scale, wy, has_g, has_seg, per_dim, precise):
  """The reverse pass."""
  r = _split_refs(refs, ("q", "k", "w", "cum_g", "seg", "p", "do", "ds_final", "ds_out", "dx", "ds0"),
                  {"w": wy, "cum_g": has_g, "seg": has_seg, "p": per_dim})
  bh, vb = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(vb * block_v, block_v)
  ld = _Loader(bh, heads, c)
  mm = r["q"].dtype

  def step(i, ds):
    n = n_chunks - 1 - i
    r["ds_out"][bh, n, :, cols] = ds.astype(r["ds_out"].dtype)
    geo = _chunk_geometry(ld, r, n, per_dim)
    q, k = ld.tok(r["q"], n), ld.tok(r["k"], n)
    do = ld.tok(r["do"], n, cols)
    ds_mm = ds.astype(mm)
    if per_dim:    # q = e * Q, k = d * K
      dx = scale * _mm(r["p"][bh, n], do, precise, ta=True) + _mm(k, ds_mm, precise)
      ld.store_tok(r["dx"], n, dx, cols)
      return _decay_state(ds, geo) + scale * _mm(q, do, precise, ta=True)
    do_e = do if geo.e is None else _rows(_f32(do), geo.e).astype(mm)
    p = scale * _mm(q, k, precise, tb=True) * geo.gamma
    dx = _mm(p.astype(mm), do, precise, ta=True) + _rows(_mm(k, ds_mm, precise), geo.d)
    ld.store_tok(r["dx"], n, dx, cols)
    ds_in = _decay_state(ds, geo) + scale * _mm(q, do_e, precise, ta=True)
    if not wy:
      return ds_in
    return ds_in - _mm(r["w"][bh, n], dx.astype(mm), precise, ta=True)

  r["ds0"][bh, :, cols] = jax.lax.fori_loop(0, n_chunks, step, r["ds_final"][bh, :, cols])


def _loop(length, body, init):
  """fori_loop over range(length), SCORE_UNROLL steps of it in straight-line code per iteration
  (the steps' loads then issue ahead of their arithmetic)."""
  unroll = max(1, min(SCORE_UNROLL, length))
  if length % unroll:
    raise ValueError(f"SCORE_UNROLL: expected a divisor of {length}, got {SCORE_UNROLL}")

  def steps(i, carry):
    for u in range(unroll):
      carry = body(i * unroll + u, carry)
    return carry

  return steps(0, init) if unroll == length else jax.lax.fori_loop(0, length // unroll, steps, init)


def _diagonal_fits(b_i, ref):
  """Whether a diagonal block of rows b_i [sub, BK] takes the matmul (SCORES_DIAGONAL_MATMUL): its
  range max |b_i - ref| against the reference row ref [BK] within DIAGONAL_MATMUL_MAX_RANGE (NaN: no)."""
  return jnp.max(jnp.abs(b_i - ref[None, :])) <= DIAGONAL_MATMUL_MAX_RANGE


def _scores_kernel(*refs, heads, c, sub, block_k, has_seg, precise):
  """The intra-chunk scores under a per-dimension decay (program (B*H, N, K/BK)), one row block of
  `sub` rows at a time: P_ts = sum_d q_td k_sd exp(b_td - b_sd) for s <= t in one segment (before
  the scale), summed over the program's `block_k` key columns d. The exponent does not factor
  into (q e^b)(k e^-b)^T without overflow, so each block of earlier rows takes a reference r = b
  of the row before the block, which keeps both factors q e^(b - r) and k e^(r - b) <= 1, and the
  diagonal block is exact, one column at a time; with SCORES_DIAGONAL_MATMUL, where its range
  allows, the matmul takes the block's own rows too (their k e^(r - b) up to e^R), masked to s <= t.
  Also stores e * Q, d * K and lambda, what the passes read in place of Q, K and the decay.
  One program per chunk: a program per row block, as `_scores_grad_kernel`, measured slower here
  (H200 runs 16-18: 4.05 against 3.90 ms fwd+bwd at 8x2048x16x128, also when it read only the key
  blocks left of its own)."""
  r = _split_refs(refs, ("q", "k", "cum_g", "seg", "p", "qe", "kd", "lam"), {"seg": has_seg})
  bh, n = pl.program_id(0), pl.program_id(1)
  # one key block: a 2-D grid (a third grid axis of 1 spills 16 more bytes, ptxas at K 128)
  kb = pl.program_id(2) if r["q"].shape[-1] > block_k else 0
  ld = _Loader(bh, heads, c)
  mm = r["q"].dtype
  kcols = pl.ds(kb * block_k, block_k)
  row_c = jax.lax.broadcasted_iota(jnp.int32, (c, block_k), 0)
  row_s = jax.lax.broadcasted_iota(jnp.int32, (sub, block_k), 0)
  row_sc, col_s = (jax.lax.broadcasted_iota(jnp.int32, (sub, c), a) for a in (0, 1))
  k, b = _f32(ld.tok(r["k"], n, kcols)), ld.tok(r["cum_g"], n, kcols)
  geo = ld.dim_geometry(r["cum_g"], r["seg"], n, kcols)
  ld.store_tok(r["qe"], n, _f32(ld.tok(r["q"], n, kcols)) * geo.e, kcols)
  ld.store_tok(r["kd"], n, k * geo.d, kcols)
  r["lam"][bh, n, kcols] = geo.lam
  seg = ld.segments(r["seg"], n)[0] if has_seg else None
  # The matmul's operands are in the inputs' dtype: float16's range (about e^(+-11), e^-16.6 with
  # subnormals) cannot hold the diagonal factors' e^(+-R); float32's and bf16's (e^(+-88)) can.
  diagonal_matmul = SCORES_DIAGONAL_MATMUL and jnp.dtype(mm) != jnp.float16
  for i in range(c // sub):
    q_i, b_i = _f32(ld.sub_rows(r["q"], n, i, sub, kcols)), ld.sub_rows(r["cum_g"], n, i, sub, kcols)
    blk = jnp.zeros((sub, c), jnp.float32)
    if i > 0 or diagonal_matmul:
      ref = ld.row(r["cum_g"], n, max(i * sub - 1, 0), kcols)       # block 0: its first row
      reach = i * sub           # the rows of k in the matmul: those before the block
      if diagonal_matmul:
        fits = _diagonal_fits(b_i, ref)
        reach += fits.astype(jnp.int32) * sub      # and the block's own where its range allows
      k_ref = k * jnp.exp(jnp.where(row_c < reach, ref[None, :] - b, -jnp.inf))
      blk = _mm((q_i * jnp.exp(b_i - ref[None, :])).astype(mm), k_ref.astype(mm), precise, tb=True)

    def diagonal_column(j, blk, i=i, q_i=q_i, b_i=b_i):
      k_j, b_j = _f32(ld.row(r["k"], n, i * sub + j, kcols)), ld.row(r["cum_g"], n, i * sub + j, kcols)
      decay = _masked_exp2(b_i - b_j[None, :], row_s >= j)
      column = jnp.sum(q_i * k_j[None, :] * decay, axis=1)
      return jnp.where(col_s == i * sub + j, column[:, None], blk)

    columns = functools.partial(_loop, sub, diagonal_column)
    if diagonal_matmul:
      # s > t entries of the matmul are finite (within e^(2R)): select them off, never scale by 0
      blk = jax.lax.cond(fits, lambda blk, i=i: jnp.where(col_s <= i * sub + row_sc, blk, 0.0), columns, blk)
    else:
      blk = columns(blk)
    if has_seg:
      seg_i = r["seg"][ld.b, pl.ds(n * c + i * sub, sub)]
      blk = blk * _mask(seg_i[:, None] == seg[None, :])
    r["p"][kb, bh, n, pl.ds(i * sub, sub), :] = blk.astype(r["p"].dtype)


def _scores_grad_kernel(*refs, heads, c, block_k, sub, precise):
  """The scores' VJP added to the state terms, one block of `sub` rows and `block_k` key columns
  per program (B*H, N * C/sub, K/BK): from dP (masked to the scores' support) the intra-chunk dq,
  dk with the same references as `_scores_kernel` (dk's: r = b of the block's last row, so
  q e^(b - r) over the later rows and k e^(r - b) stay <= 1) and the diagonal block exact or, with
  SCORES_DIAGONAL_MATMUL where its range allows, one more step of each loop, over dP's diagonal tile
  (zero off the support, as `_dqk_kernel` stores it); db += q * dq - k * dk of those intra-chunk terms."""
  r = _split_refs(refs, ("q", "k", "cum_g", "dp", "dq_state", "dk_state", "db_state", "dq", "dk", "db"), {})
  nb = c // sub
  bh, n, i, kb = pl.program_id(0), pl.program_id(1) // nb, pl.program_id(1) % nb, pl.program_id(2)
  kcols = pl.ds(kb * block_k, block_k)
  ld = _Loader(bh, heads, c)
  row_s = jax.lax.broadcasted_iota(jnp.int32, (sub, block_k), 0)
  rows = pl.ds(i * sub, sub)
  ld_rows = functools.partial(ld.sub_rows, n=n, i=i, sub=sub, cols=kcols)
  q_i, k_i, b_i = _f32(ld_rows(r["q"])), _f32(ld_rows(r["k"])), ld_rows(r["cum_g"])
  zero = jnp.zeros((sub, block_k), jnp.float32)
  ref = ld.row(r["cum_g"], n, jnp.maximum(i * sub - 1, 0), kcols)     # block 0 has no earlier rows
  diagonal_steps = 0        # 1: each loop below takes the diagonal tile too
  if SCORES_DIAGONAL_MATMUL:
    fits = _diagonal_fits(b_i, ref)
    diagonal_steps = fits.astype(jnp.int32)

  def earlier(j, acc, ref=ref):
    k_j, b_j = _f32(ld.sub_rows(r["k"], n, j, sub, kcols)), ld.sub_rows(r["cum_g"], n, j, sub, kcols)
    return acc + _mm(r["dp"][bh, n, rows, pl.ds(j * sub, sub)], k_j * jnp.exp(ref[None, :] - b_j), precise)

  dq_i = jnp.exp(b_i - ref[None, :]) * jax.lax.fori_loop(0, i + diagonal_steps, earlier, zero)
  # the last block has no later rows; b non-increasing, the block's rows lie within R of this ref too
  ref = ld.row(r["cum_g"], n, i * sub + sub - 1, kcols)

  def later(j, acc, ref=ref):
    q_j, b_j = _f32(ld.sub_rows(r["q"], n, j, sub, kcols)), ld.sub_rows(r["cum_g"], n, j, sub, kcols)
    return acc + _mm(r["dp"][bh, n, pl.ds(j * sub, sub), rows], q_j * jnp.exp(b_j - ref[None, :]), precise, ta=True)

  dk_i = jnp.exp(ref[None, :] - b_i) * jax.lax.fori_loop(i + 1 - diagonal_steps, nb, later, zero)

  def diagonal(j, acc):
    dq_i, dk_i = acc
    t = i * sub + j
    k_j, q_j, b_j = (_f32(ld.row(x, n, t, kcols)) for x in (r["k"], r["q"], r["cum_g"]))
    dp_col = r["dp"][bh, n, rows, t]          # dP[t', t] for t' in the block: key row t
    dp_row = r["dp"][bh, n, t, rows]          # dP[t, s] for s in the block: query row t
    # dq's factor e^(b_t' - b_t) lives on the rows t' >= t, dk's e^(b_t - b_s) on s <= t: one exp2
    # of the difference signed per row serves both (row t's is 1 in each). Half the MUFU work, but
    # not measurably faster (H100 run 27, 8x2048x16x128 fwd+bwd 3.38 against 3.39 ms with two); loading
    # dP's 16x16 diagonal tile once instead of this column and row was slower (3.75 ms).
    later_rows, earlier_rows = row_s >= j, row_s <= j
    diff = b_i - b_j[None, :]
    decay = jnp.exp2(jnp.where(later_rows, diff, -diff) * _LOG2_E)
    dq_decay, dk_decay = jnp.where(later_rows, decay, 0.0), jnp.where(earlier_rows, decay, 0.0)
    dq_i += dp_col[:, None] * k_j[None, :] * dq_decay
    dk_i += dp_row[:, None] * q_j[None, :] * dk_decay
    return dq_i, dk_i

  columns = functools.partial(_loop, sub, diagonal)
  if SCORES_DIAGONAL_MATMUL:
    dq_i, dk_i = jax.lax.cond(fits, lambda acc: acc, columns, (dq_i, dk_i))
  else:
    dq_i, dk_i = columns((dq_i, dk_i))
  db_i = ld_rows(r["db_state"]) + q_i * dq_i - k_i * dk_i
  ld.store_sub_rows(r["dq"], n, i, sub, ld_rows(r["dq_state"]) + dq_i, kcols)
  ld.store_sub_rows(r["dk"], n, i, sub, ld_rows(r["dk_state"]) + dk_i, kcols)
  ld.store_sub_rows(r["db"], n, i, sub, db_i, kcols)


def _operand(low, dtype):
  """The cast of a float32 intermediate for a gradient kernel's matmul: to the inputs' `dtype`
  with BF16_GRAD_OPERANDS (`low`), else float32 (TF32)."""
  return (lambda x: x.astype(dtype)) if low else _f32


def _dqk_kernel(*refs, heads, c, block_k, block_v, scale, wy, has_g, has_seg, per_dim, low, precise):
  """dq, the dk terms outside the WY solve, dW = -dX S^T and the log-decay gradient's terms of one
  chunk and one block of key columns (program (B*H, N, K/BK)). Per-dimension decay: only the
  state terms of dq, dk and db (float32), and dP = scale dO X^T for `_scores_grad_kernel`."""
  r = _split_refs(refs, ("q", "k", "x", "cum_g", "seg", "do", "dx", "s_in", "ds_out",
                         "dq", "dk", "dw", "db", "dp"),
                  {"dx": wy, "dw": wy, "cum_g": has_g, "seg": has_seg, "db": has_g, "dp": per_dim})
  bh, n, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kcols = pl.ds(kb * block_k, block_k)
  ld = _Loader(bh, heads, c)
  zeros = lambda *s: jnp.zeros(s, jnp.float32)
  dp, dqe, xh, dw = zeros(c, c), zeros(c, block_k), zeros(c, block_k), zeros(c, block_k)
  dlam = zeros(block_k) if per_dim else jnp.float32(0.0)
  for j in range(r["x"].shape[-1] // block_v):
    cols = pl.ds(j * block_v, block_v)
    do, x = ld.tok(r["do"], n, cols), ld.tok(r["x"], n, cols)
    s = r["s_in"][bh, n, kcols, cols]
    hs = r["ds_out"][bh, n, kcols, cols]
    dp += _mm(do, x, precise, tb=True)
    dqe += _mm(do, s, precise, tb=True)
    xh += _mm(x.astype(hs.dtype), hs, precise, tb=True)
    if wy:
      dx = ld.tok(r["dx"], n, cols)
      dw -= _mm(dx, s.astype(dx.dtype), precise, tb=True)
    if per_dim:
      dlam += jnp.sum(_f32(hs) * _f32(s), axis=1)
    elif has_g:
      dlam += jnp.sum(_f32(hs) * _f32(s))
  q_in, k_in = ld.tok(r["q"], n, kcols), ld.tok(r["k"], n, kcols)
  q, k = _f32(q_in), _f32(k_in)
  if per_dim:
    _dim_state_grads(ld, r, bh, n, kb, kcols, scale * dp, dqe, xh, dlam, q, k, scale)
    return
  geo = ld.geometry(r["cum_g"], r["seg"], n)
  op = _operand(low, r["q"].dtype)
  dpg = op(scale * dp * geo.gamma)
  dq_state = scale * _rows(dqe, geo.e)
  ld.store_tok(r["dq"], n, _mm(dpg, op(k_in), precise) + dq_state, kcols)
  xh = _rows(xh, geo.d)
  ld.store_tok(r["dk"], n, _mm(dpg, op(q_in), precise, ta=True) + xh, kcols)
  if wy:
    ld.store_tok(r["dw"], n, dw, kcols)
  if has_g:
    # every term is a sum over key columns: the blocks' partial sums add up in `chunk_grads`
    dgam = dp * (scale * _mm(q_in, k_in, precise, tb=True) * geo.gamma)     # dP * P, this block's share of P
    xh_k = jnp.sum(xh * k, axis=1)
    db = jnp.sum(dq_state * q, axis=1) - xh_k + jnp.sum(dgam, axis=1) - jnp.sum(dgam, axis=0)
    lam = 1.0 if geo.lam is None else geo.lam
    idx = jax.lax.broadcasted_iota(jnp.int32, (c,), 0)
    db = db + jnp.where(idx == c - 1, jnp.sum(xh_k) + lam * dlam, 0.0)
    r["db"][kb, ld.b, pl.ds(n * c, c), ld.h] = db


def _dim_state_grads(ld, r, bh, n, kb, kcols, dp, dqe, xh, dlam, q, k, scale):
  """`_dqk_kernel`'s stores under a per-dimension decay, from its sums over value blocks:
  dq = scale e * (dO S^T), dk = d * (X H^T) and, per key dimension,
  db = q * dq - k * dk (+ on the last row colsum(k * dk) + lambda * rowsum(S * H)); dP once per chunk."""
  geo = ld.dim_geometry(r["cum_g"], r["seg"], n, kcols)
  dq = scale * geo.e * dqe
  dk = geo.d * xh
  ld.store_tok(r["dq"], n, dq, kcols)
  ld.store_tok(r["dk"], n, dk, kcols)
  kdk = k * dk
  rows = jax.lax.broadcasted_iota(jnp.int32, dk.shape, 0)
  last = jnp.sum(kdk, axis=0) + geo.lam * dlam
  ld.store_tok(r["db"], n, q * dq - kdk + jnp.where(rows == ld.c - 1, last[None, :], 0.0), kcols)

  @pl.when(kb == 0)
  def _():
    rows, cols = _iota(ld.c)
    support = rows >= cols
    if r["seg"] is not None:
      seg = ld.segments(r["seg"], n)[0]
      support = support & (seg[:, None] == seg[None, :])
    r["dp"][bh, n] = jnp.where(support, dp, 0.0)


def _wy_grad_kernel(*refs, heads, c, block_k, block_v, has_g, has_seg, low, precise):
  """Back through the WY solve of one chunk (program (B*H, N)): dv, dbeta, the rest of dk and of
  the log-decay gradient, from dU = dX, dW and the forward's T (solving again took 15 serial
  masked-reduction steps per chunk: H200 run 7, 8x2048x16x128 delta rule fwd+bwd 2.93 ms stored, 4.13
  solved)."""
  r = _split_refs(refs, ("k", "v", "beta", "cum_g", "seg", "t", "x", "dx", "dw", "dk_part",
                         "dk", "dv", "dbeta", "db"),
                  {"cum_g": has_g, "seg": has_seg, "db": has_g})
  bh, n = pl.program_id(0), pl.program_id(1)
  ld = _Loader(bh, heads, c)
  geo, _, beta, kkt, a = _a_terms(ld, r, n, precise)
  op = _operand(low, r["k"].dtype)
  t = op(r["t"][bh, n])
  e = _vec(geo.e, c)
  ra, dbeta = jnp.zeros((c, c), jnp.float32), jnp.zeros((c,), jnp.float32)
  for j in range(r["v"].shape[-1] // block_v):
    cols = pl.ds(j * block_v, block_v)
    rr = _mm(t, op(ld.tok(r["dx"], n, cols)), precise, ta=True)          # R = T^T dX
    ld.store_tok(r["dv"], n, _rows(rr, beta), cols)
    ra += _mm(op(rr), op(ld.tok(r["x"], n, cols)), precise, tb=True)
    dbeta += jnp.sum(rr * _f32(ld.tok(r["v"], n, cols)), axis=1)
  rows, cols_ = _iota(c)
  da = jnp.where((rows > cols_) & geo.causal, -ra, 0.0)               # dA = -R X^T on A's support
  g_op = op(beta[:, None] * geo.gamma * da)
  be = beta * e
  rsk = jnp.zeros((c,), jnp.float32)
  for j in range(r["k"].shape[-1] // block_k):
    kcols = pl.ds(j * block_k, block_k)
    rk = _mm(t, op(ld.tok(r["dw"], n, kcols)), precise, ta=True)         # R_K = T^T dW
    k_in = ld.tok(r["k"], n, kcols)
    rsk += jnp.sum(rk * _f32(k_in), axis=1)
    k_op = op(k_in)
    dk = (_f32(ld.tok(r["dk_part"], n, kcols)) + _rows(rk, be) + _mm(g_op, k_op, precise)
          + _mm(g_op, k_op, precise, ta=True))
    ld.store_tok(r["dk"], n, dk, kcols)
  ld.store_scalar(r["dbeta"], n, dbeta + e * rsk + jnp.sum(da * kkt * geo.gamma, axis=1))
  if has_g:
    dga = da * a
    ld.store_scalar(r["db"], n, be * rsk + jnp.sum(dga, axis=1) - jnp.sum(dga, axis=0))


# ---------------------------------------------------------------------------------------------
# Calls


def _params(interpret, warps_stages):
  return None if interpret else _compat.triton_params(*warps_stages)


def _flags(cum_g, seg):
  return {"has_g": cum_g is not None, "has_seg": seg is not None}


def _present(*xs):
  return [x for x in xs if x is not None]


def _cumsum_kernel(x_ref, out_ref, *, heads, c, block_k, reverse):
  """The float32 cumulative sum inside chunk n of one block of key columns of a [B, T, H, K]
  array (program (B*H, N, K/BK)); `reverse`: from the chunk's end, as the chunk total minus the
  inclusive sum plus the row (Triton's scan runs forward only)."""
  bh, n, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ld = _Loader(bh, heads, c)
  cols = pl.ds(kb * block_k, block_k)
  x = _f32(ld.tok(x_ref, n, cols))
  total = jnp.cumsum(x, axis=0)
  if reverse:
    total = jnp.sum(x, axis=0)[None, :] - total + x
  ld.store_tok(out_ref, n, total, cols)


def _pallas_cumsum(x, chunk, *, reverse, out_dtype, interpret):
  b, t, h, kd = x.shape
  bk = _block_v(kd, CUMSUM_BLOCK_K)
  kernel = functools.partial(_cumsum_kernel, heads=h, c=chunk, block_k=bk, reverse=reverse)
  return pl.pallas_call(kernel, grid=(b * h, t // chunk, kd // bk), interpret=interpret,
                        out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
                        compiler_params=_params(interpret, CUMSUM_PARAMS))(x)


def chunk_cumsum(g, chunk, interpret=False):
  """[B, T, H] or [B, T, H, K] log decay -> its float32 inclusive cumulative sum inside each chunk
  of T, once per forward, rather than as a masked [C, C] reduction in every kernel's every chunk:
  H200 run 10, gated delta rule 8x2048x16x128 fwd+bwd 2.05 against 3.00 ms (None stays None).
  A per-dimension decay's in `_cumsum_kernel` with PALLAS_CUMSUM, else in XLA; the kernel reads g
  in its own dtype, so a bf16 g needs no float32 copy first."""
  if g is None:
    return None
  if PALLAS_CUMSUM and g.ndim == 4:
    return _pallas_cumsum(g, chunk, reverse=False, out_dtype=jnp.float32, interpret=interpret)
  b, t = g.shape[:2]
  return jnp.cumsum(g.astype(jnp.float32).reshape(b, t // chunk, chunk, *g.shape[2:]), axis=2).reshape(g.shape)


def _grad_dtype(dtype):
  """dtype of the backward's stored intermediates for inputs of `dtype` (BF16_GRAD_OPERANDS)."""
  return dtype if BF16_GRAD_OPERANDS else jnp.float32


def _is_per_dim(cum_g):
  return cum_g is not None and cum_g.ndim == 4


def wy(k, v, beta, cum_g, seg, *, chunk, t_dtype=None, interpret=False):
  """W [B*H, N, C, K], U [B*H, N, C, V] in k's dtype and, if `t_dtype`, T [B*H, N, C, C] in it
  (else None). k, v: [B, T, H, *] with T = N*C; beta [B, T, H] float32; cum_g: `chunk_cumsum` of
  the [B, T, H] log decay, or None when ungated; seg: [B, T] int32 or None."""
  b, t, h, kd = k.shape
  vd = v.shape[-1]
  n = t // chunk
  out = [jax.ShapeDtypeStruct((b * h, n, chunk, kd), k.dtype),
         jax.ShapeDtypeStruct((b * h, n, chunk, vd), k.dtype)]
  if t_dtype is not None:
    out.append(jax.ShapeDtypeStruct((b * h, n, chunk, chunk), t_dtype))
  kernel = functools.partial(_wy_kernel, heads=h, c=chunk, block_v=_block_v(vd), want_t=t_dtype is not None,
                             precise=_precision(k.dtype, interpret), **_flags(cum_g, seg))
  res = pl.pallas_call(kernel, grid=(b * h, n), out_shape=tuple(out), interpret=interpret,
                       compiler_params=_params(interpret, WY_PARAMS),
                       )(*_present(k, v, beta, cum_g, seg))
  return res if t_dtype is not None else (*res, None)


def forward(q, k, v, beta, g, s0, seg, *, scale, chunk, store_states, interpret=False):
  """O [B, T, H, V] in v's dtype, the final state [B*H, K, V] float32 and, if `store_states`, what
  the backward needs (else None): the state entering every chunk [B*H, N, K, V] in q's dtype (the
  forward's matmuls already rounded it so), and for the delta rule W [B*H, N, C, K] and
  X [B, T, H, V] in q's dtype and the solve's T [B*H, N, C, C] (float32; q's dtype with
  BF16_GRAD_OPERANDS) (GLA: None for each), what `scores` returned (None unless the decay is
  per-dimension) and `chunk_cumsum` of g (None ungated). s0: [B*H, K, V] float32.
  beta None: GLA, X = V, with a scalar [B, T, H] or no decay g, or a per-dimension one
  [B, T, H, K] (then also what `scores` returns, for the passes); else the delta rule, X = U - W S.
  With `store_states` and SPLIT_OUTPUT: O from `_output_kernel` after the state pass (without
  the states stored, inference, the split has nothing to read them from: O stays fused)."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n = t // chunk
  bv = _block_v(vd, STATE_BLOCK_V)
  wy_terms = beta is not None
  split = store_states and SPLIT_OUTPUT
  precise = _precision(q.dtype, interpret)
  cum_g = chunk_cumsum(g, chunk, interpret)
  saved_cum_g = cum_g
  per_dim = _is_per_dim(cum_g)
  decayed = p = None
  if per_dim:    # the passes read e * Q, d * K and lambda (segment masks included) in place of q, k, cum_g
    decayed = scores(q, k, cum_g, seg, chunk=chunk, interpret=interpret)
    p, q, k, cum_g = decayed
    seg = None
  flags = dict(_flags(cum_g, seg), per_dim=per_dim)
  w = u = t_inv = None
  if wy_terms:
    t_dtype = _grad_dtype(q.dtype) if store_states else None
    w, u, t_inv = wy(k, v, beta, cum_g, seg, chunk=chunk, t_dtype=t_dtype, interpret=interpret)
  o_shape = jax.ShapeDtypeStruct(v.shape, v.dtype)
  out = [] if split else [o_shape]
  out.append(jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32))
  if store_states:
    out.append(jax.ShapeDtypeStruct((b * h, n, kd, vd), q.dtype))
    if wy_terms:
      out.append(jax.ShapeDtypeStruct(v.shape, q.dtype))
  kernel = functools.partial(_forward_kernel, heads=h, c=chunk, n_chunks=n, block_v=bv, scale=scale,
                             wy=wy_terms, store_states=store_states, with_output=not split,
                             precise=precise, **flags)
  res = iter(pl.pallas_call(kernel, grid=(b * h, vd // bv), out_shape=tuple(out), interpret=interpret,
                            compiler_params=_params(interpret, FORWARD_PARAMS),
                            )(*_present(None if split else q, k, None if wy_terms else v, w, u, cum_g, seg,
                                        None if split else p, s0)))
  o = None if split else next(res)
  s_final = next(res)
  s_in = next(res) if store_states else None
  x = next(res) if store_states and wy_terms else None
  if split:
    bo = _block_v(vd)    # chunk-parallel: N programs per head already fill the GPU
    kernel = functools.partial(_output_kernel, heads=h, c=chunk, block_v=bo, scale=scale,
                               precise=precise, **flags)
    o = pl.pallas_call(kernel, grid=(b * h, n, vd // bo), out_shape=o_shape, interpret=interpret,
                       compiler_params=_params(interpret, OUTPUT_PARAMS),
                       )(*_present(q, k, x if wy_terms else v, cum_g, seg, p, s_in))
  return o, s_final, (s_in, w, x, t_inv, decayed, saved_cum_g) if store_states else None


def scores(q, k, cum_g, seg, *, chunk, interpret=False):
  """Under a per-dimension decay, what the passes read (`_scores_kernel`): the intra-chunk scores
  P [B*H, N, C, C] (before the scale), e * Q and d * K [B, T, H, K], all in q's dtype, and lambda
  [B*H, N, K] float32. cum_g: `chunk_cumsum` of the [B, T, H, K] log decay."""
  b, t, h, kd = q.shape
  n = t // chunk
  bk = kd if SCORES_BLOCK_K is None else min(SCORES_BLOCK_K, kd)
  if bk <= 0 or kd % bk:
    raise ValueError(f"SCORES_BLOCK_K: expected None, K={kd} or more, or a positive divisor of K, got {SCORES_BLOCK_K}")
  nk = kd // bk
  kernel = functools.partial(_scores_kernel, heads=h, c=chunk, sub=min(SCORE_BLOCK, chunk), block_k=bk,
                             has_seg=seg is not None, precise=_precision(q.dtype, interpret))
  p_dtype = q.dtype if nk == 1 else jnp.float32
  p, qe, kdk, lam = pl.pallas_call(
      kernel, grid=(b * h, n) if nk == 1 else (b * h, n, nk), interpret=interpret,
      out_shape=(jax.ShapeDtypeStruct((nk, b * h, n, chunk, chunk), p_dtype),
                 jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, q.dtype),
                 jax.ShapeDtypeStruct((b * h, n, kd), jnp.float32)),
      compiler_params=_params(interpret, SCORES_PARAMS),
  )(*_present(q, k, cum_g, seg))
  p = p.reshape(p.shape[1:]) if nk == 1 else p.sum(0).astype(q.dtype)
  return p, qe, kdk, lam


def state_grads(q, k, w, cum_g, seg, do, ds_final, *, scale, chunk, decayed=None, interpret=False):
  """The reverse pass: dL/dS leaving every chunk [B*H, N, K, V] (float32; q's dtype with
  BF16_GRAD_OPERANDS), the initial-state gradient [B*H, K, V] float32 and dL/dX [B, T, H, V]
  (the delta rule: as dL/dS; GLA, X = V: dv in do's dtype). w: W of `wy` (None for GLA); cum_g:
  `chunk_cumsum` of the log decay or None; decayed: under a per-dimension decay what `scores`
  returned (q, k, cum_g and seg are then unused), else None; do: [B, T, H, V] in q's dtype."""
  p = None
  if decayed is not None:
    p, q, k, cum_g = decayed
    seg = None
  b, t, h, kd = q.shape
  vd = do.shape[-1]
  n = t // chunk
  bv = _block_v(vd, STATE_BLOCK_V)
  wy_terms = w is not None
  precise = _precision(q.dtype, interpret)
  kernel = functools.partial(_state_grad_kernel, heads=h, c=chunk, n_chunks=n, block_v=bv, scale=scale,
                             wy=wy_terms, precise=precise, per_dim=p is not None, **_flags(cum_g, seg))
  ds_out, dx, ds0 = pl.pallas_call(
      kernel, grid=(b * h, vd // bv), interpret=interpret,
      out_shape=(jax.ShapeDtypeStruct((b * h, n, kd, vd), _grad_dtype(q.dtype)),
                 jax.ShapeDtypeStruct(do.shape, _grad_dtype(q.dtype) if wy_terms else do.dtype),
                 jax.ShapeDtypeStruct((b * h, kd, vd), jnp.float32)),
      compiler_params=_params(interpret, STATE_GRAD_PARAMS),
  )(*_present(q, k, w, cum_g, seg, p, do, ds_final))
  return ds_out, ds0, dx


def chunk_reverse_cumsum(x, chunk, interpret=False, out_dtype=jnp.float32):
  """[B, T, H(, K)] float32 -> the reverse cumulative sum inside each chunk of T in `out_dtype`
  (the VJP of `chunk_cumsum`; [B, T, H, K] in `_cumsum_kernel` with PALLAS_CUMSUM, which writes
  `out_dtype` itself: a bf16 dg then needs no separate cast of a float32 one)."""
  if PALLAS_CUMSUM and x.ndim == 4:
    return _pallas_cumsum(x, chunk, reverse=True, out_dtype=out_dtype, interpret=interpret)
  b, t = x.shape[:2]
  x = x.reshape(b, t // chunk, chunk, *x.shape[2:])
  return jnp.flip(jnp.cumsum(jnp.flip(x, 2), axis=2), 2).reshape(b, t, *x.shape[3:]).astype(out_dtype)


def chunk_grads(q, k, v, beta, cum_g, seg, do, s_in, ds_out, x, dx, t_inv, *, scale, chunk, dg_dtype=jnp.float32,
                interpret=False):
  """Every chunk's input gradients from the state entering it (s_in) and the gradient of the
  state leaving it (ds_out), both [B*H, N, K, V], the forward's X and dL/dX (the delta rule; for
  GLA x is None, X = V, and dx is dv): dq, dk, dv in the inputs' dtype, dbeta [B, T, H] float32
  and dg [B, T, H] in `dg_dtype` (dbeta None for GLA, beta None; dg None when ungated; [B, T, H, K]
  for a per-dimension decay). cum_g: `chunk_cumsum` of the log decay or None. t_inv: the forward's T [B*H, N, C, C]
  (GLA: None). dW between the kernels is in ds_out's dtype.
  Two kernels: `_dqk_kernel` (program per chunk and key block) and, for the delta rule,
  `_wy_grad_kernel` (per chunk) through the solve, or for a per-dimension decay
  `_scores_grad_kernel` (per chunk and key block) through the intra-chunk scores, from the dP
  that `_dqk_kernel` stores; splitting them keeps each kernel's float32 accumulators within the
  register file."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  n = t // chunk
  wy_terms = beta is not None
  per_dim = _is_per_dim(cum_g)
  bk = _block_v(kd, GRAD_BLOCK_K)
  bv = _block_v(vd, GRAD_BLOCK_V)
  flags = _flags(cum_g, seg)
  precise = _precision(q.dtype, interpret)
  low = ds_out.dtype != jnp.float32
  state_only = wy_terms or per_dim          # dq / dk get more terms after this kernel
  out = [jax.ShapeDtypeStruct(q.shape, jnp.float32 if per_dim else q.dtype),
         jax.ShapeDtypeStruct(k.shape, jnp.float32 if state_only else k.dtype)]
  if wy_terms:
    out.append(jax.ShapeDtypeStruct(k.shape, ds_out.dtype))
  if per_dim:
    out += [jax.ShapeDtypeStruct(cum_g.shape, jnp.float32), jax.ShapeDtypeStruct((b * h, n, chunk, chunk), jnp.float32)]
  elif cum_g is not None:
    out.append(jax.ShapeDtypeStruct((kd // bk, b, t, h), jnp.float32))
  kernel = functools.partial(_dqk_kernel, heads=h, c=chunk, block_k=bk, block_v=bv, scale=scale,
                             wy=wy_terms, per_dim=per_dim, low=low, precise=precise, **flags)
  res = pl.pallas_call(kernel, grid=(b * h, n, kd // bk), out_shape=tuple(out), interpret=interpret,
                       compiler_params=_params(interpret, DQK_PARAMS),
                       )(*_present(q, k, x if wy_terms else v, cum_g, seg, do, dx if wy_terms else None,
                                   s_in, ds_out))
  if per_dim:
    sub = min(SCORE_BLOCK, chunk)
    bk = _block_v(kd, SCORES_GRAD_BLOCK_K)
    kernel = functools.partial(_scores_grad_kernel, heads=h, c=chunk, block_k=bk, sub=sub, precise=precise)
    dq, dk, db = pl.pallas_call(
        kernel, grid=(b * h, n * (chunk // sub), kd // bk), interpret=interpret,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(cum_g.shape, jnp.float32)),
        compiler_params=_params(interpret, SCORES_GRAD_PARAMS),
    )(q, k, cum_g, res[3], *res[:3])
    return dq, dk, dx, None, chunk_reverse_cumsum(db, chunk, interpret, dg_dtype)
  dq, dk = res[0], res[1]
  db = None if cum_g is None else jnp.sum(res[-1], axis=0)
  dv, dbeta = dx, None
  if wy_terms:
    out = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
           jax.ShapeDtypeStruct(beta.shape, jnp.float32)]
    if cum_g is not None:
      out.append(jax.ShapeDtypeStruct(cum_g.shape, jnp.float32))
    kernel = functools.partial(_wy_grad_kernel, heads=h, c=chunk, block_k=bk, block_v=bv,
                               low=low, precise=precise, **flags)
    res = pl.pallas_call(kernel, grid=(b * h, n), out_shape=tuple(out), interpret=interpret,
                         compiler_params=_params(interpret, WY_GRAD_PARAMS),
                         )(*_present(k, v, beta, cum_g, seg, t_inv, x, dx, res[2], dk))
    dk, dv, dbeta = res[:3]
    if cum_g is not None:
      db = db + res[3]
  dg = None if cum_g is None else chunk_reverse_cumsum(db, chunk, interpret, dg_dtype)
  return dq, dk, dv, dbeta, dg


def backward(q, k, v, beta, seg, saved, do, ds_final, *, scale, chunk, dg_dtype=jnp.float32, interpret=False):
  """(dq, dk, dv in the inputs' dtype, dbeta float32, dg in `dg_dtype` (None when beta / g is None),
  ds0 [B*H, K, V]). saved: what `forward(store_states=True)` returned for the backward."""
  s_in, w, x, t_inv, decayed, cum_g = saved
  ds_out, ds0, dx = state_grads(q, k, w, cum_g, seg, do, ds_final, scale=scale, chunk=chunk, decayed=decayed,
                                interpret=interpret)
  grads = chunk_grads(q, k, v, beta, cum_g, seg, do, s_in, ds_out, x, dx, t_inv, scale=scale, chunk=chunk,
                      dg_dtype=dg_dtype, interpret=interpret)
  return (*grads, ds0)
