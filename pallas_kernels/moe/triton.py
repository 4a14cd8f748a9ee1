"""Pallas (Triton backend) kernels for the MoE dispatch on NVIDIA GPUs: a row gather and the
grouped weight gradient of a ragged dot. `interpret=True` runs them anywhere (tests).

Both exist because of what XLA and tokamax 0.0.17 do with the MoE layer on the H100
(experiments/NOTES.md, sessions 10-12): XLA's row gather of the sorted tokens was given a
column-major layout to serve a transpose (~0.8 ms of a 5.1 ms layer), and tokamax's Hopper
weight-gradient kernel returned run-to-run different results.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat

_GATHER_ROWS = (32, 16, 8)
_GATHER_COLS = (256, 128, 64, 32, 16)
WGRAD_BLOCK_ROWS = 64
_WGRAD_BLOCK_COLS = (128, 64, 32, 16)
WGRAD_WARPS_STAGES = (8, 3)


def _first_divisor(n, choices):
  return next((b for b in choices if n % b == 0), None)


def gather_rows_supported(p: int, d: int) -> bool:
  """Whether `gather_rows` tiles P output rows of width D."""
  return _first_divisor(p, _GATHER_ROWS) is not None and _first_divisor(d, _GATHER_COLS) is not None


def _gather_kernel(idx_ref, x_ref, o_ref, *, rows, cols):
  i, c = pl.program_id(0), pl.program_id(1)
  r = pl.ds(pl.multiple_of(i * rows, rows), rows)
  cs = pl.ds(pl.multiple_of(c * cols, cols), cols)
  o_ref[r, cs] = x_ref[idx_ref[r], cs]


def gather_rows(x_ND, idx_P, *, interpret: bool = False):
  """x[idx] ([P, D]; every index in [0, N)): [rows, cols] output tiles, each a gather of whole
  row segments, so loads and stores are coalesced and the output is row-major whatever reads it
  (a custom call: XLA cannot hand it a layout)."""
  (p,), d = idx_P.shape, x_ND.shape[1]
  if not gather_rows_supported(p, d):
    raise ValueError(f"idx_P, x_ND: expected P divisible by one of {_GATHER_ROWS} and D by one of "
                     f"{_GATHER_COLS}, got P={p}, D={d}")
  rows, cols = _first_divisor(p, _GATHER_ROWS), _first_divisor(d, _GATHER_COLS)
  # No block specs: both refs are whole arrays, indexed in the kernel.
  return pl.pallas_call(
      functools.partial(_gather_kernel, rows=rows, cols=cols), grid=(p // rows, d // cols),
      out_shape=jax.ShapeDtypeStruct((p, d), x_ND.dtype),
      compiler_params=None if interpret else _compat.triton_params(4, 1), interpret=interpret)(
          idx_P.astype(jnp.int32), x_ND)


def grouped_weight_grad_supported(k: int, n: int) -> bool:
  """Whether `grouped_weight_grad` tiles a [K, N] weight."""
  return _first_divisor(k, _WGRAD_BLOCK_COLS) is not None and _first_divisor(n, _WGRAD_BLOCK_COLS) is not None


def _wgrad_kernel(start_ref, size_ref, x_ref, dy_ref, o_ref, *, bm, bk, bn, precision):
  """Program (g, k block, n block): the sum over group g's rows of x[r, kb]^T dy[r, nb], bm
  rows a step from the group's first row; rows of the window outside the group are zeroed (in
  both operands, so a non-finite value of a neighbouring group cannot leak in)."""
  g, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, size = start_ref[g], size_ref[g]
  kc = pl.ds(pl.multiple_of(kb * bk, bk), bk)
  nc = pl.ds(pl.multiple_of(nb * bn, bn), bn)
  row = jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)

  def step(i, acc):
    keep = (i * bm + row) < size
    rows = pl.ds(start + i * bm, bm)
    x = jnp.where(keep, x_ref[rows, kc], 0)
    dy = jnp.where(keep, dy_ref[rows, nc], 0)
    return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                                     precision=precision)

  o_ref[g, kc, nc] = jax.lax.fori_loop(0, (size + bm - 1) // bm, step, jnp.zeros((bk, bn), jnp.float32))


def grouped_weight_grad(x_PK, dy_PN, group_sizes_G, *, interpret: bool = False):
  """[G, K, N] float32: per group g, x[rows of g]^T @ dy[rows of g] (rows grouped in order by
  `group_sizes`, sum <= P; rows past the groups ignored): the weight gradient of a ragged dot.
  One program per (group, K block, N block) walks its group's rows; nothing is padded or
  gathered, and the result is exact up to float32 accumulation order."""
  (p, k), n, g = x_PK.shape, dy_PN.shape[1], group_sizes_G.shape[0]
  if dy_PN.shape[0] != p:
    raise ValueError(f"dy_PN: expected {p} rows like x_PK, got shape {dy_PN.shape}")
  if not grouped_weight_grad_supported(k, n):
    raise ValueError(f"x_PK, dy_PN: expected K and N divisible by one of {_WGRAD_BLOCK_COLS}, got K={k}, N={n}")
  bm, bk, bn = WGRAD_BLOCK_ROWS, _first_divisor(k, _WGRAD_BLOCK_COLS), _first_divisor(n, _WGRAD_BLOCK_COLS)
  sizes = group_sizes_G.astype(jnp.int32)
  starts = jnp.cumsum(sizes) - sizes
  # bm rows of zeros past the end: a group's last step reads up to bm - 1 rows beyond it.
  pad = lambda a: jnp.pad(a, ((0, bm), (0, 0)))
  # float32 inputs: three-pass TF32 on the GPU (HIGHEST lowers to scalar FMA loops there, see
  # chunk_kernels_triton._precision); the CPU interpreter has no TF32x3.
  precision = None
  if x_PK.dtype == jnp.float32:
    precision = jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return pl.pallas_call(
      functools.partial(_wgrad_kernel, bm=bm, bk=bk, bn=bn, precision=precision),
      grid=(g, k // bk, n // bn), out_shape=jax.ShapeDtypeStruct((g, k, n), jnp.float32),
      compiler_params=None if interpret else _compat.triton_params(*WGRAD_WARPS_STAGES),
      interpret=interpret)(starts, sizes, pad(x_PK), pad(dy_PN))
