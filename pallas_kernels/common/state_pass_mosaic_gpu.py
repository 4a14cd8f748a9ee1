"""Pallas kernels (GPU, Mosaic GPU lowering: TMA and wgmma on Hopper) for the sequential part of
the chunked algorithm.

Same contract as `state_pass_triton`, for 16-bit terms: one warpgroup per (batch*head, 64-wide
value block) walks the chunks. Per chunk, TMA copies the chunk's terms into swizzled shared
memory; the float32 state stays in registers (WGMMA layout), and its 16-bit copy in shared memory
is the B operand of the wgmmas (16-bit operands, float32 accumulators). The state entering every
chunk goes back to HBM through a float32 staging buffer and a TMA store that overlaps the next
chunk's work.

wgmma tiles need C, K and V to be multiples of 64 (M of a warpgroup matmul is 64, and 128-byte
swizzled tiles hold 64 16-bit values per row); wgmma takes float32 only as TF32, so float32
inputs stay on the Triton kernels (`supports`, `dispatch.pallas_backend`). Needs jax >= 0.11.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # jax builds without Mosaic GPU
  plgpu = None

BLOCK_V = 64
SWIZZLE = 128  # bytes


def supports(dtype, c, kd, vd) -> str | None:
  """Why these kernels cannot take terms of this dtype / chunk / key / value size, or None."""
  if plgpu is None or not hasattr(plgpu, "InterpretGPUParams"):
    return f"jax {jax.__version__} has no Pallas Mosaic GPU interpret mode (needs jax >= 0.11)"
  if jnp.dtype(dtype).itemsize != 2:
    return f"wgmma takes float32 only as TF32; got {jnp.dtype(dtype).name} terms"
  for name, size in (("chunk_size", c), ("K", kd), ("V", vd)):
    if size % 64:
      return f"{name} must be a multiple of 64 for wgmma tiles, got {size}"
  return None


def _smem(shape, dtype):
  """Shared memory laid out for wgmma operands and TMA: 128-byte swizzle, (8, 64) tiles."""
  per_row = SWIZZLE // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, per_row)),
                                              plgpu.SwizzleTransform(SWIZZLE)))


def _matmul(shape, *operand_pairs):
  """sum of a @ b over the (a, b) shared-memory operand pairs, as a float32 [M, N] array."""
  def body(acc):
    for a, b in operand_pairs:
      plgpu.wgmma(acc, a, b)
    return acc[...]   # reading the accumulator waits for the wgmmas
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _fetch(pairs, barriers):
  """TMA copies of (HBM ref, shared buffer) pairs, each on its own barrier; then waits for all."""
  for i, (src, dst) in enumerate(pairs):
    plgpu.copy_gmem_to_smem(src, dst, barriers.at[i])
  for i in range(len(pairs)):
    plgpu.barrier_wait(barriers.at[i])


def _row_scale(decay_ref, x):
  """diag(decay) x for a [K] float32 HBM vector and a WGMMA-layout [K, BV] array."""
  d = plgpu.load(decay_ref, layout=plgpu.Layout.WGMMA.reduce(1))
  return lax.broadcast_in_dim(d, x.shape, [0]) * x


def _stage_out(value, staging, dst):
  """Writes a float32 register array to HBM through `staging` once the previous TMA store out of
  it has read it."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  staging[...] = value
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(staging, dst)


def _forward_body(*refs, n_chunks, has_w):
  if has_w:
    qe, p, kd, decay, u, w, s0, o, s_in, s_final = refs[:10]
    qe_s, p_s, kd_s, u_s, w_s, s_s, x_s, o_s, f32_s, bars = refs[10:]
  else:
    qe, p, kd, decay, u, s0, o, s_in, s_final = refs[:9]
    qe_s, p_s, kd_s, u_s, s_s, x_s, o_s, f32_s, bars = refs[9:]
  bh = lax.axis_index("bh")
  cols = pl.ds(lax.axis_index("v") * BLOCK_V, BLOCK_V)
  c, kd_dim = qe_s.shape
  mm = s_s.dtype
  _fetch([(s0.at[bh, :, cols], f32_s)], bars)
  s_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def step(n, s):
    _stage_out(s, f32_s, s_in.at[bh, n, :, cols])
    s_s[...] = s.astype(mm)
    plgpu.commit_smem()
    pairs = [(qe.at[bh, n], qe_s), (p.at[bh, n], p_s), (kd.at[bh, n], kd_s), (u.at[bh, n, :, cols], u_s)]
    _fetch(pairs + ([(w.at[bh, n], w_s)] if has_w else []), bars)
    x_src = u_s   # GLA: X = U
    if has_w:
      x = plgpu.load(u_s, layout=plgpu.Layout.WGMMA).astype(jnp.float32) - _matmul((c, BLOCK_V), (w_s, s_s))
      x_s[...] = x.astype(mm)
      plgpu.commit_smem()
      x_src = x_s
    out = _matmul((c, BLOCK_V), (qe_s, s_s), (p_s, x_src))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    o_s[...] = out.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o.at[bh, n, :, cols])
    return _row_scale(decay.at[bh, n], s) + _matmul((kd_dim, BLOCK_V), (kd_s.transpose((1, 0)), x_src))

  s = lax.fori_loop(0, n_chunks, step, s_init)
  _stage_out(s, f32_s, s_final.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _backward_body(*refs, n_chunks, has_w):
  if has_w:
    qe, p, kd, decay, w, do, ds_final, ds_out, ds0 = refs[:9]
    qe_s, p_s, kd_s, w_s, do_s, ds_s, y_s, f32_s, bars = refs[9:]
  else:
    qe, decay, do, ds_final, ds_out, ds0 = refs[:6]
    qe_s, do_s, f32_s, bars = refs[6:]
  bh = lax.axis_index("bh")
  cols = pl.ds(lax.axis_index("v") * BLOCK_V, BLOCK_V)
  c, kd_dim = qe_s.shape
  _fetch([(ds_final.at[bh, :, cols], f32_s)], bars)
  ds_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def step(i, ds):
    n = n_chunks - 1 - i
    _stage_out(ds, f32_s, ds_out.at[bh, n, :, cols])
    pairs = [(qe.at[bh, n], qe_s), (do.at[bh, n, :, cols], do_s)]
    if has_w:
      ds_s[...] = ds.astype(ds_s.dtype)
      plgpu.commit_smem()
      pairs += [(p.at[bh, n], p_s), (kd.at[bh, n], kd_s), (w.at[bh, n], w_s)]
    _fetch(pairs, bars)
    ds_in = _row_scale(decay.at[bh, n], ds) + _matmul((kd_dim, BLOCK_V), (qe_s.transpose((1, 0)), do_s))
    if not has_w:
      return ds_in
    y = _matmul((c, BLOCK_V), (kd_s, ds_s), (p_s.transpose((1, 0)), do_s))
    y_s[...] = y.astype(y_s.dtype)
    plgpu.commit_smem()
    return ds_in - _matmul((kd_dim, BLOCK_V), (w_s.transpose((1, 0)), y_s))

  ds = lax.fori_loop(0, n_chunks, step, ds_init)
  _stage_out(ds, f32_s, ds0.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _check(dtype, c, kd, vd):
  why = supports(dtype, c, kd, vd)
  if why:
    raise ValueError(f"Mosaic GPU state-pass kernels: {why}")


def _call(body, out_type, scratch, grid, interpret, *args):
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("bh", "v"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*args)


def state_pass_forward(terms, s0, out_dtype, *, interpret=False):
  """O [BH, N, C, V] and the states entering each chunk [BH, N, K, V] plus the final one."""
  bh, n, c, kd = terms.qe_CK.shape
  vd = terms.u_CV.shape[-1]
  mm = terms.qe_CK.dtype
  _check(mm, c, kd, vd)
  has_w = terms.w_CK is not None
  scratch = [_smem((c, kd), mm), _smem((c, c), mm), _smem((c, kd), mm), _smem((c, BLOCK_V), mm)]
  scratch += [_smem((c, kd), mm)] if has_w else []
  scratch += [_smem((kd, BLOCK_V), mm), _smem((c, BLOCK_V), mm), _smem((c, BLOCK_V), out_dtype),
              plgpu.SMEM((kd, BLOCK_V), jnp.float32), plgpu.Barrier(num_barriers=5)]
  inputs = [terms.qe_CK, terms.p_CC, terms.kd_CK, terms.decay_K, terms.u_CV]
  inputs += ([terms.w_CK] if has_w else []) + [s0]
  out_type = (jax.ShapeDtypeStruct((bh, n, c, vd), out_dtype), jax.ShapeDtypeStruct((bh, n, kd, vd), jnp.float32),
              jax.ShapeDtypeStruct((bh, kd, vd), jnp.float32))
  o, s_in, s_final = _call(functools.partial(_forward_body, n_chunks=n, has_w=has_w), out_type, scratch,
                           (bh, vd // BLOCK_V), interpret, *inputs)
  return o, s_in, s_final


def state_pass_backward(terms, do, ds_final, *, interpret=False):
  """The state gradients leaving each chunk [BH, N, K, V] and the initial-state gradient."""
  bh, n, c, kd = terms.qe_CK.shape
  vd = do.shape[-1]
  mm = terms.qe_CK.dtype
  _check(mm, c, kd, vd)
  has_w = terms.w_CK is not None
  if has_w:
    inputs = [terms.qe_CK, terms.p_CC, terms.kd_CK, terms.decay_K, terms.w_CK, do, ds_final]
    scratch = [_smem((c, kd), mm), _smem((c, c), mm), _smem((c, kd), mm), _smem((c, kd), mm),
               _smem((c, BLOCK_V), mm), _smem((kd, BLOCK_V), mm), _smem((c, BLOCK_V), mm)]
  else:
    inputs = [terms.qe_CK, terms.decay_K, do, ds_final]
    scratch = [_smem((c, kd), mm), _smem((c, BLOCK_V), mm)]
  scratch += [plgpu.SMEM((kd, BLOCK_V), jnp.float32), plgpu.Barrier(num_barriers=5)]
  out_type = (jax.ShapeDtypeStruct((bh, n, kd, vd), jnp.float32), jax.ShapeDtypeStruct((bh, kd, vd), jnp.float32))
  return _call(functools.partial(_backward_body, n_chunks=n, has_w=has_w), out_type, scratch,
               (bh, vd // BLOCK_V), interpret, *inputs)
