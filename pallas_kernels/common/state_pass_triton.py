"""Pallas kernels (GPU, Triton lowering) for the sequential part of the chunked algorithm.

Each program owns one (batch*head, value block) pair and walks the chunks in
order (forward) or in reverse (backward) with the float32 state in registers;
every step is a handful of [C, K] x [K, BV] matmuls on the tensor cores. The
chunk-parallel work (intra-chunk scores, the WY solve, the per-chunk
gradients) stays in XLA, batched over all chunks at once.

Arrays are passed whole and indexed with program ids, so N needs no padding
to a power of two. Shapes: terms [BH, N, C, *], states [BH, N, K, V].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat


def _dot(a, b, precise):
  return jnp.dot(a, b, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST if precise else None)


def _forward_kernel(*refs, n_chunks, block_v, has_w, precise):
  if has_w:
    qe, p, kd, decay, u, w, s0, o, s_in, s_final = refs
  else:
    qe, p, kd, decay, u, s0, o, s_in, s_final = refs
  bh, vb = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(vb * block_v, block_v)
  mm = qe.dtype

  def step(n, s):
    s_in[bh, n, :, cols] = s
    s_mm = s.astype(mm)
    x = u[bh, n, :, cols]
    if has_w:
      x = (x.astype(jnp.float32) - _dot(w[bh, n], s_mm, precise)).astype(mm)
    o[bh, n, :, cols] = (_dot(qe[bh, n], s_mm, precise) + _dot(p[bh, n], x, precise)).astype(o.dtype)
    return decay[bh, n][:, None] * s + _dot(kd[bh, n].T, x, precise)

  s_final[bh, :, cols] = jax.lax.fori_loop(0, n_chunks, step, s0[bh, :, cols])


def _backward_kernel(*refs, n_chunks, block_v, has_w, precise):
  if has_w:
    qe, p, kd, decay, w, do, ds_final, ds_out, ds0 = refs
  else:
    qe, decay, do, ds_final, ds_out, ds0 = refs
  bh, vb = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(vb * block_v, block_v)
  mm = qe.dtype

  def step(i, ds):
    n = n_chunks - 1 - i
    ds_out[bh, n, :, cols] = ds
    do_n = do[bh, n, :, cols]
    ds_in = decay[bh, n][:, None] * ds + _dot(qe[bh, n].T, do_n, precise)
    if has_w:
      y = _dot(kd[bh, n], ds.astype(mm), precise) + _dot(p[bh, n].T, do_n, precise)
      ds_in -= _dot(w[bh, n].T, y.astype(mm), precise)
    return ds_in

  ds0[bh, :, cols] = jax.lax.fori_loop(0, n_chunks, step, ds_final[bh, :, cols])


def _block_v(vd):
  return 64 if vd % 64 == 0 else vd


def _grid_and_params(bh, vd):
  return (bh, vd // _block_v(vd)), _compat.triton_params(num_warps=4, num_stages=1)


def state_pass_forward(terms, s0, out_dtype, *, interpret=False):
  """O [BH, N, C, V] and the states entering each chunk [BH, N, K, V] plus the final one."""
  bh, n, c, kd = terms.qe_CK.shape
  vd = terms.u_CV.shape[-1]
  has_w = terms.w_CK is not None
  precise = terms.qe_CK.dtype == jnp.float32
  grid, params = _grid_and_params(bh, vd)
  kernel = functools.partial(_forward_kernel, n_chunks=n, block_v=_block_v(vd), has_w=has_w, precise=precise)
  inputs = [terms.qe_CK, terms.p_CC, terms.kd_CK, terms.decay_K, terms.u_CV] + ([terms.w_CK] if has_w else []) + [s0]
  return pl.pallas_call(
      kernel, grid=grid, compiler_params=None if interpret else params, interpret=interpret,
      out_shape=(jax.ShapeDtypeStruct((bh, n, c, vd), out_dtype),
                 jax.ShapeDtypeStruct((bh, n, kd, vd), jnp.float32),
                 jax.ShapeDtypeStruct((bh, kd, vd), jnp.float32)),
  )(*inputs)


def state_pass_backward(terms, do, ds_final, *, interpret=False):
  """The state gradients leaving each chunk [BH, N, K, V] and the initial-state gradient."""
  bh, n, c, kd = terms.qe_CK.shape
  vd = do.shape[-1]
  has_w = terms.w_CK is not None
  precise = terms.qe_CK.dtype == jnp.float32
  grid, params = _grid_and_params(bh, vd)
  kernel = functools.partial(_backward_kernel, n_chunks=n, block_v=_block_v(vd), has_w=has_w, precise=precise)
  if has_w:
    inputs = [terms.qe_CK, terms.p_CC, terms.kd_CK, terms.decay_K, terms.w_CK, do, ds_final]
  else:
    inputs = [terms.qe_CK, terms.decay_K, do, ds_final]
  return pl.pallas_call(
      kernel, grid=grid, compiler_params=None if interpret else params, interpret=interpret,
      out_shape=(jax.ShapeDtypeStruct((bh, n, kd, vd), jnp.float32),
                 jax.ShapeDtypeStruct((bh, kd, vd), jnp.float32)),
  )(*inputs)
