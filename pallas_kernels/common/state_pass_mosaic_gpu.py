"""Pallas kernels (GPU, Mosaic GPU lowering: TMA and wgmma on Hopper) for the sequential part of
the chunked algorithm.

Same contract as `state_pass_triton`, for 16-bit terms: one warpgroup per (batch*head, 64-wide
value block) walks the chunks. Per chunk, TMA copies the chunk's terms into swizzled shared
memory (two buffer slots where they fit, so chunk n+1's copies overlap chunk n's wgmmas); the
float32 state stays in registers (WGMMA layout), and its 16-bit copy in shared memory is the B
operand of the wgmmas (16-bit operands, float32 accumulators). The state entering every chunk
goes back to HBM through a float32 staging buffer and a TMA store that overlaps the next chunk's
work.

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
SMEM_BUDGET = 200 * 1024  # of the H100's 227 KB per block
SMEM_LIMIT = 227 * 1024   # shared memory per block on the H100
REDUCTION_SCRATCH = 128 * 4 * 4   # Mosaic GPU's default reduction_scratch_bytes (jax 0.12)


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


def _fetch_one(src, dst, barrier):
  plgpu.copy_gmem_to_smem(src, dst, barrier)
  plgpu.barrier_wait(barrier)


def _walk(n_chunks, sources, buffers, barriers, body, carry, *, reverse):
  """Runs `carry = body(n, views, carry)` over the chunks (in reverse if `reverse`), where `views`
  are the shared-memory copies of `sources[j](n)` (HBM ref views). With two buffer slots (a
  leading axis of 2 on every buffer) the TMA copies of the next chunk's inputs go out before this
  chunk's wgmmas, into the slot the previous chunk has finished reading; with one slot, right
  after this chunk's wgmmas."""
  slots, n_in = buffers[0].shape[0], len(buffers)
  chunk = (lambda i: n_chunks - 1 - i) if reverse else (lambda i: i)

  def fetch(i, slot):
    for j, (src, buf) in enumerate(zip(sources, buffers)):
      plgpu.copy_gmem_to_smem(src(chunk(i)), buf.at[slot], barriers.at[slot * n_in + j])

  def prefetch(i, slot):
    @pl.when(i + 1 < n_chunks)
    def _():
      fetch(i + 1, slot)

  fetch(0, 0)

  def step(i, carry):
    slot = lax.rem(i, slots)
    if slots > 1:
      prefetch(i, 1 - slot)
    for j in range(n_in):
      plgpu.barrier_wait(barriers.at[slot * n_in + j])
    carry = body(chunk(i), [buf.at[slot] for buf in buffers], carry)
    if slots == 1:
      prefetch(i, 0)
    return carry

  return lax.fori_loop(0, n_chunks, step, carry)


def _row_scale(decay_ref, x):
  """diag(decay) x for a [K] float32 HBM vector and a WGMMA-layout [K, BV] array."""
  # optimized=False: jax 0.11's Mosaic GPU has optimized (vectorised) register transfers only for
  # shared memory and refuses them for an HBM ref ("Only optimized transfers to SMEM supported");
  # jax 0.12 plans them for HBM too. The plain loads read the same K values (once per chunk).
  d = plgpu.load(decay_ref, layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
  return lax.broadcast_in_dim(d, x.shape, [0]) * x


def _stage_out(value, staging, dst):
  """Writes a float32 register array to HBM through `staging` once the previous TMA store out of
  it has read it."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  staging[...] = value
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(staging, dst)


def _forward_body(*refs, n_chunks, has_w):
  n_in = 5 if has_w else 4
  qe, p, kd, decay, u = refs[:5]
  w = refs[5] if has_w else None
  s0, o, s_in, s_final = refs[n_in + 1:n_in + 5]
  *buffers, s_s, x_s, o_s, f32_s, bars = refs[n_in + 5:]
  bh = lax.axis_index("bh")
  cols = pl.ds(lax.axis_index("v") * BLOCK_V, BLOCK_V)
  c, kd_dim = buffers[0].shape[1:]
  mm = s_s.dtype
  sources = [lambda n: qe.at[bh, n], lambda n: p.at[bh, n], lambda n: kd.at[bh, n],
             lambda n: u.at[bh, n, :, cols]] + ([lambda n: w.at[bh, n]] if has_w else [])
  last_barrier = bars.at[bars.shape[0] - 1]
  _fetch_one(s0.at[bh, :, cols], f32_s, last_barrier)
  s_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def body(n, views, s):
    qe_v, p_v, kd_v, u_v = views[:4]
    _stage_out(s, f32_s, s_in.at[bh, n, :, cols])
    s_s[...] = s.astype(mm)
    plgpu.commit_smem()
    x_src = u_v   # GLA: X = U
    if has_w:
      x = plgpu.load(u_v, layout=plgpu.Layout.WGMMA).astype(jnp.float32) - _matmul((c, BLOCK_V), (views[4], s_s))
      x_s[...] = x.astype(mm)
      plgpu.commit_smem()
      x_src = x_s
    out = _matmul((c, BLOCK_V), (qe_v, s_s), (p_v, x_src))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    o_s[...] = out.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o.at[bh, n, :, cols])
    return _row_scale(decay.at[bh, n], s) + _matmul((kd_dim, BLOCK_V), (kd_v.transpose((1, 0)), x_src))

  s = _walk(n_chunks, sources, buffers, bars, body, s_init, reverse=False)
  _stage_out(s, f32_s, s_final.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _backward_body(*refs, n_chunks, has_w):
  if has_w:
    qe, p, kd, decay, w, do, ds_final, ds_out, ds0 = refs[:9]
    *buffers, ds_s, y_s, f32_s, bars = refs[9:]
  else:
    qe, decay, do, ds_final, ds_out, ds0 = refs[:6]
    *buffers, f32_s, bars = refs[6:]
  bh = lax.axis_index("bh")
  cols = pl.ds(lax.axis_index("v") * BLOCK_V, BLOCK_V)
  c, kd_dim = buffers[0].shape[1:]
  sources = [lambda n: qe.at[bh, n], lambda n: do.at[bh, n, :, cols]]
  if has_w:
    sources += [lambda n: p.at[bh, n], lambda n: kd.at[bh, n], lambda n: w.at[bh, n]]
  _fetch_one(ds_final.at[bh, :, cols], f32_s, bars.at[bars.shape[0] - 1])
  ds_init = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def body(n, views, ds):
    qe_v, do_v = views[:2]
    _stage_out(ds, f32_s, ds_out.at[bh, n, :, cols])
    ds_in = _row_scale(decay.at[bh, n], ds) + _matmul((kd_dim, BLOCK_V), (qe_v.transpose((1, 0)), do_v))
    if not has_w:
      return ds_in
    p_v, kd_v, w_v = views[2:]
    ds_s[...] = ds.astype(ds_s.dtype)
    plgpu.commit_smem()
    y = _matmul((c, BLOCK_V), (kd_v, ds_s), (p_v.transpose((1, 0)), do_v))
    y_s[...] = y.astype(y_s.dtype)
    plgpu.commit_smem()
    return ds_in - _matmul((kd_dim, BLOCK_V), (w_v.transpose((1, 0)), y_s))

  ds = _walk(n_chunks, sources, buffers, bars, body, ds_init, reverse=True)
  _stage_out(ds, f32_s, ds0.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _check(dtype, c, kd, vd):
  why = supports(dtype, c, kd, vd)
  if why:
    raise ValueError(f"Mosaic GPU state-pass kernels: {why}")


def _nbytes(shape, dtype):
  size = jnp.dtype(dtype).itemsize
  for d in shape:
    size *= d
  return size


def _scratch(per_chunk, fixed, n_barriers_extra=1, max_slots=2):
  """Shared memory: the per-chunk input buffers (two slots when both fit in SMEM_BUDGET and
  `max_slots` allows, so the next chunk's copies overlap this chunk's work; else one), the fixed
  buffers, and the TMA barriers (one per input and slot, plus `n_barriers_extra`). Buffers are
  (shape, dtype, swizzled): swizzled ones are laid out for wgmma (`_smem`), the others plain."""
  per_slot = sum(_nbytes(shape, dtype) for shape, dtype, _ in per_chunk)
  fixed_bytes = sum(_nbytes(shape, dtype) for shape, dtype, _ in fixed)
  slots = 2 if max_slots > 1 and 2 * per_slot + fixed_bytes <= SMEM_BUDGET else 1
  smem = lambda shape, dtype, swizzled: _smem(shape, dtype) if swizzled else plgpu.SMEM(shape, dtype)
  buffers = [smem((slots, *shape), dtype, swizzled) for shape, dtype, swizzled in per_chunk]
  rest = [smem(*buffer) for buffer in fixed]
  return buffers + rest + [plgpu.Barrier(num_barriers=slots * len(per_chunk) + n_barriers_extra)]


def smem_need(per_chunk, fixed, n_barriers_extra=1):
  """Bytes of shared memory a block asks for, at most: one buffer slot's worth of the per-chunk
  buffers, the fixed ones and, as the compiler reserves besides, REDUCTION_SCRATCH and 8 bytes a
  barrier (measured on the H100: the gated delta-rule forward at K 128, chunk 128 asked for its
  buffers plus 2112)."""
  need = sum(_nbytes(shape, dtype) for shape, dtype, _ in per_chunk + fixed)
  return need + REDUCTION_SCRATCH + 8 * (2 * len(per_chunk) + n_barriers_extra)


def smem_overflow(layouts, where=""):
  """The first of `layouts` ({what: (per_chunk, fixed, n_barriers_extra)}) whose one buffer slot
  overflows a block's shared memory, as a reason naming it (and `where`), or None."""
  for what, layout in layouts.items():
    need = smem_need(*layout)
    if need > SMEM_LIMIT:
      return (f"{what}: {need // 1024} KiB of shared memory per block{where}, over the {SMEM_LIMIT // 1024} KiB "
              "of the H100")
  return None


def scratch_within(what, per_chunk, fixed, n_barriers_extra=1, max_slots=2):
  """`_scratch`, or a ValueError naming `what` where even one buffer slot overflows shared memory
  (a large K with a large chunk), which the Mosaic GPU compiler would only report on the GPU."""
  why = smem_overflow({what: (per_chunk, fixed, n_barriers_extra)})
  if why is not None:
    raise ValueError(f"{why}; a smaller chunk_size fits")
  return _scratch(per_chunk, fixed, n_barriers_extra, max_slots)


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
  per_chunk = [((c, kd), mm, True), ((c, c), mm, True), ((c, kd), mm, True), ((c, BLOCK_V), mm, True)]
  per_chunk += [((c, kd), mm, True)] if has_w else []
  fixed = [((kd, BLOCK_V), mm, True), ((c, BLOCK_V), mm, True), ((c, BLOCK_V), out_dtype, True),
           ((kd, BLOCK_V), jnp.float32, False)]
  inputs = [terms.qe_CK, terms.p_CC, terms.kd_CK, terms.decay_K, terms.u_CV]
  inputs += ([terms.w_CK] if has_w else []) + [s0]
  out_type = (jax.ShapeDtypeStruct((bh, n, c, vd), out_dtype), jax.ShapeDtypeStruct((bh, n, kd, vd), jnp.float32),
              jax.ShapeDtypeStruct((bh, kd, vd), jnp.float32))
  o, s_in, s_final = _call(functools.partial(_forward_body, n_chunks=n, has_w=has_w), out_type,
                           _scratch(per_chunk, fixed), (bh, vd // BLOCK_V), interpret, *inputs)
  return o, s_in, s_final


def state_pass_backward(terms, do, ds_final, *, interpret=False):
  """The state gradients leaving each chunk [BH, N, K, V] and the initial-state gradient."""
  bh, n, c, kd = terms.qe_CK.shape
  vd = do.shape[-1]
  mm = terms.qe_CK.dtype
  _check(mm, c, kd, vd)
  has_w = terms.w_CK is not None
  per_chunk = [((c, kd), mm, True), ((c, BLOCK_V), mm, True)]
  fixed = [((kd, BLOCK_V), jnp.float32, False)]
  if has_w:
    inputs = [terms.qe_CK, terms.p_CC, terms.kd_CK, terms.decay_K, terms.w_CK, do, ds_final]
    per_chunk += [((c, c), mm, True), ((c, kd), mm, True), ((c, kd), mm, True)]
    fixed = [((kd, BLOCK_V), mm, True), ((c, BLOCK_V), mm, True)] + fixed
  else:
    inputs = [terms.qe_CK, terms.decay_K, do, ds_final]
  out_type = (jax.ShapeDtypeStruct((bh, n, kd, vd), jnp.float32), jax.ShapeDtypeStruct((bh, kd, vd), jnp.float32))
  return _call(functools.partial(_backward_body, n_chunks=n, has_w=has_w), out_type,
               _scratch(per_chunk, fixed), (bh, vd // BLOCK_V), interpret, *inputs)
