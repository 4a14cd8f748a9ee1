"""Pallas kernels (TPU, Mosaic) for the sequential part of the chunked algorithm.

Same contract as `state_pass_triton`. The grid is (batch*head, value block,
chunk) with the chunk axis "arbitrary": Mosaic walks it in order on one core
while the float32 state lives in a VMEM scratch buffer; the backward walks it
in reverse through its index maps. Blocks are whole [C, K] / [C, BV] tiles
(BV = 128 where V allows), which meets the (8, 128) tiling rule; per-chunk
decays travel as [K, 1] columns so scaling the state's rows needs no transpose.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat

_CONTRACT_ROWS = (((0,), (0,)), ((), ()))  # a^T b


def _dot(a, b, precise, dims=None):
  precision = jax.lax.Precision.HIGHEST if precise else None
  if dims is None:
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _forward_kernel(*refs, n_chunks, has_w, precise):
  if has_w:
    qe, p, kd, decay, u, w, s0, o, s_in, s_final, s_scr = refs
  else:
    qe, p, kd, decay, u, s0, o, s_in, s_final, s_scr = refs
  n = pl.program_id(2)
  mm = qe.dtype

  @pl.when(n == 0)
  def _():
    s_scr[...] = s0[...]

  s = s_scr[...]
  s_in[...] = s
  s_mm = s.astype(mm)
  x = u[...]
  if has_w:
    x = (x.astype(jnp.float32) - _dot(w[...], s_mm, precise)).astype(mm)
  o[...] = (_dot(qe[...], s_mm, precise) + _dot(p[...], x, precise)).astype(o.dtype)
  s = decay[...] * s + _dot(kd[...], x, precise, _CONTRACT_ROWS)
  s_scr[...] = s

  @pl.when(n == n_chunks - 1)
  def _():
    s_final[...] = s


def _backward_kernel(*refs, n_chunks, has_w, precise):
  if has_w:
    qe, p, kd, decay, w, do, ds_final, ds_out, ds0, ds_scr = refs
  else:
    qe, decay, do, ds_final, ds_out, ds0, ds_scr = refs
  i = pl.program_id(2)
  mm = qe.dtype

  @pl.when(i == 0)
  def _():
    ds_scr[...] = ds_final[...]

  ds = ds_scr[...]
  ds_out[...] = ds
  do_n = do[...]
  ds_in = decay[...] * ds + _dot(qe[...], do_n, precise, _CONTRACT_ROWS)
  if has_w:
    y = _dot(kd[...], ds.astype(mm), precise) + _dot(p[...], do_n, precise, _CONTRACT_ROWS)
    ds_in -= _dot(w[...], y.astype(mm), precise, _CONTRACT_ROWS)
  ds_scr[...] = ds_in

  @pl.when(i == n_chunks - 1)
  def _():
    ds0[...] = ds_in


def _block_v(vd):
  return 128 if vd % 128 == 0 else vd


class _Specs:
  """Block specs over the grid (bh, vb, step); `chunk(step)` maps a step to a chunk index."""

  def __init__(self, n, c, kd, bv, reverse):
    chunk = (lambda s: n - 1 - s) if reverse else (lambda s: s)
    self.keys = pl.BlockSpec((None, None, c, kd), lambda bh, vb, s: (bh, chunk(s), 0, 0))
    self.scores = pl.BlockSpec((None, None, c, c), lambda bh, vb, s: (bh, chunk(s), 0, 0))
    self.decay = pl.BlockSpec((None, None, kd, 1), lambda bh, vb, s: (bh, chunk(s), 0, 0))
    self.values = pl.BlockSpec((None, None, c, bv), lambda bh, vb, s: (bh, chunk(s), 0, vb))
    self.states = pl.BlockSpec((None, None, kd, bv), lambda bh, vb, s: (bh, chunk(s), 0, vb))
    self.state = pl.BlockSpec((None, kd, bv), lambda bh, vb, s: (bh, 0, vb))


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[scratch],
      compiler_params=_compat.tpu_params(("parallel", "parallel", "arbitrary")),
      interpret=_compat.tpu_interpret() if interpret else False)


def state_pass_forward(terms, s0, out_dtype, *, interpret=False):
  """O [BH, N, C, V] and the states entering each chunk [BH, N, K, V] plus the final one."""
  bh, n, c, kd = terms.qe_CK.shape
  vd = terms.u_CV.shape[-1]
  bv = _block_v(vd)
  has_w = terms.w_CK is not None
  sp = _Specs(n, c, kd, bv, reverse=False)
  inputs = [terms.qe_CK, terms.p_CC, terms.kd_CK, terms.decay_K[..., None], terms.u_CV]
  specs = [sp.keys, sp.scores, sp.keys, sp.decay, sp.values]
  if has_w:
    inputs.append(terms.w_CK)
    specs.append(sp.keys)
  kernel = functools.partial(_forward_kernel, n_chunks=n, has_w=has_w,
                             precise=terms.qe_CK.dtype == jnp.float32)
  return _call(
      kernel, (bh, vd // bv, n), specs + [sp.state], (sp.values, sp.states, sp.state),
      (jax.ShapeDtypeStruct((bh, n, c, vd), out_dtype),
       jax.ShapeDtypeStruct((bh, n, kd, vd), jnp.float32),
       jax.ShapeDtypeStruct((bh, kd, vd), jnp.float32)),
      _compat.tpu_vmem((kd, bv), jnp.float32), interpret)(*inputs, s0)


def state_pass_backward(terms, do, ds_final, *, interpret=False):
  """The state gradients leaving each chunk [BH, N, K, V] and the initial-state gradient."""
  bh, n, c, kd = terms.qe_CK.shape
  vd = do.shape[-1]
  bv = _block_v(vd)
  has_w = terms.w_CK is not None
  sp = _Specs(n, c, kd, bv, reverse=True)
  decay = terms.decay_K[..., None]
  if has_w:
    inputs = [terms.qe_CK, terms.p_CC, terms.kd_CK, decay, terms.w_CK]
    specs = [sp.keys, sp.scores, sp.keys, sp.decay, sp.keys]
  else:
    inputs, specs = [terms.qe_CK, decay], [sp.keys, sp.decay]
  kernel = functools.partial(_backward_kernel, n_chunks=n, has_w=has_w,
                             precise=terms.qe_CK.dtype == jnp.float32)
  return _call(
      kernel, (bh, vd // bv, n), specs + [sp.values, sp.state], (sp.states, sp.state),
      (jax.ShapeDtypeStruct((bh, n, kd, vd), jnp.float32),
       jax.ShapeDtypeStruct((bh, kd, vd), jnp.float32)),
      _compat.tpu_vmem((kd, bv), jnp.float32), interpret)(*inputs, do, ds_final)
