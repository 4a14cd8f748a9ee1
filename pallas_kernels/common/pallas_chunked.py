"""The chunked algorithm with Pallas kernels.

`make_pallas_op` (TPU, and the older GPU path): chunk-parallel work runs in XLA over all
chunks at once: the family's `chunk_terms` in the forward, and in the backward the per-chunk
VJP given the stored incoming state and the state gradient from the backward kernel. The two
passes over chunks (states forward, state gradients in reverse) are the Pallas kernels of the
backend module: `state_pass_triton` or `state_pass_mosaic_gpu` on GPU, `state_pass_tpu` on TPU.

`make_fused_op` (GPU; the delta rule and GLA): every stage, chunk-parallel work included, is a
kernel of `chunk_kernels_triton`; the only arrays between kernels are the delta rule's WY terms
W, U, X and T = (I + A)^-1 (a [C, C] array per chunk), dX and dW, the states entering each chunk
and their gradients; GLA with a per-dimension decay adds its intra-chunk scores P and their
gradient dP ([C, C] per chunk).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import chunk_kernels_triton, state_pass_mosaic_gpu, state_pass_tpu, state_pass_triton
from pallas_kernels.common.chunked import ChunkTerms, chunk_vjp
from pallas_kernels.common.chunking import num_chunks

# backend name -> (kernel module, interpret argument)
BACKENDS = {
    "triton": (state_pass_triton, False),
    "tpu": (state_pass_tpu, False),
    "interpret": (state_pass_triton, True),
    "tpu_interpret": (state_pass_tpu, True),
    "mosaic_gpu": (state_pass_mosaic_gpu, False),
    "mosaic_gpu_interpret": (state_pass_mosaic_gpu, True),
}


def _over_bhn(f):
  return jax.vmap(jax.vmap(jax.vmap(f)))


def _kernel_terms(terms: ChunkTerms, mm_dtype) -> ChunkTerms:
  """[B, H, N, ...] float32 terms -> [B*H, N, ...] in the matmul dtype (decay stays float32)."""
  flat = lambda a: None if a is None else a.reshape(-1, *a.shape[2:])
  cast = lambda a: None if a is None else flat(a).astype(mm_dtype)
  return ChunkTerms(qe_CK=cast(terms.qe_CK), p_CC=cast(terms.p_CC), kd_CK=cast(terms.kd_CK),
                    decay_K=flat(terms.decay_K), u_CV=cast(terms.u_CV), w_CK=cast(terms.w_CK))


def make_pallas_op(chunk_terms):
  """Like `chunked.make_chunked_op`, plus a static `backend` (a key of BACKENDS)."""

  def kernel_terms(scale, q, k, v, gates, seg, prev):
    terms = _over_bhn(lambda *a: chunk_terms(*a, scale))(q, k, v, gates, seg, prev)
    return _kernel_terms(terms, q.dtype)

  def forward(scale, backend, q, k, v, gates, s0, seg, prev):
    module, interpret = BACKENDS[backend]
    b, h = q.shape[:2]
    terms = kernel_terms(scale, q, k, v, gates, seg, prev)
    o, s_in, s_final = module.state_pass_forward(
        terms, s0.reshape(b * h, *s0.shape[2:]), v.dtype, interpret=interpret)
    unflat = lambda a: a.reshape(b, h, *a.shape[1:])
    return unflat(o), unflat(s_final), unflat(s_in)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
  def op(scale, backend, q, k, v, gates, s0, seg, prev):
    o, s_final, _ = forward(scale, backend, q, k, v, gates, s0, seg, prev)
    return o, s_final

  def op_fwd(scale, backend, q, k, v, gates, s0, seg, prev):
    o, s_final, s_in = forward(scale, backend, q, k, v, gates, s0, seg, prev)
    return (o, s_final), (q, k, v, gates, seg, prev, s_in)

  def op_bwd(scale, backend, residuals, cotangents):
    q, k, v, gates, seg, prev, s_in = residuals
    do, ds_final = cotangents
    module, interpret = BACKENDS[backend]
    b, h = q.shape[:2]
    terms = kernel_terms(scale, q, k, v, gates, seg, prev)
    ds_out, ds0 = module.state_pass_backward(
        terms, do.reshape(b * h, *do.shape[2:]).astype(q.dtype),
        ds_final.reshape(b * h, *ds_final.shape[2:]), interpret=interpret)
    ds_out = ds_out.reshape(b, h, *ds_out.shape[1:])
    dq, dk, dv, dgates, _ = _over_bhn(functools.partial(chunk_vjp, chunk_terms, scale))(
        q, k, v, gates, seg, prev, s_in, do, ds_out)
    return dq, dk, dv, dgates, ds0.reshape(ds_final.shape), None, None

  op.defvjp(op_fwd, op_bwd)
  return op


def make_fused_op():
  """`op(scale, chunk, interpret, q, k, v, beta, g, s0, seg) -> (o, s_final)` on [B, T, H, *]
  inputs with T a multiple of `chunk`; beta [B, T, H] float32 (None: GLA), g float32 [B, T, H],
  [B, T, H, K] in any float dtype (GLA only; dg comes back in it) or None (no decay),
  s0 [B, H, K, V] float32, seg [B, T] int32 or None.
  Forward and backward are the kernels of `chunk_kernels_triton` (interpret mode when `interpret`)."""
  kernels = chunk_kernels_triton

  def forward(scale, chunk, interpret, q, k, v, beta, g, s0, seg, store_states):
    b, _, h, _ = q.shape
    o, s_final, saved = kernels.forward(q, k, v, beta, g, s0.reshape(b * h, *s0.shape[2:]), seg,
                                        scale=scale, chunk=chunk, store_states=store_states,
                                        interpret=interpret)
    return o, s_final.reshape(s0.shape), saved

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
  def op(scale, chunk, interpret, q, k, v, beta, g, s0, seg):
    o, s_final, _ = forward(scale, chunk, interpret, q, k, v, beta, g, s0, seg, False)
    return o, s_final

  def op_fwd(scale, chunk, interpret, q, k, v, beta, g, s0, seg):
    o, s_final, saved = forward(scale, chunk, interpret, q, k, v, beta, g, s0, seg, True)
    # Residuals must be arrays: g's dtype, which dg is written in, travels as an empty one.
    g_dtype = None if g is None else jnp.zeros((0,), g.dtype)
    return (o, s_final), (q, k, v, beta, seg, saved, g_dtype)

  def op_bwd(scale, chunk, interpret, residuals, cotangents):
    q, k, v, beta, seg, saved, g_dtype = residuals
    do, ds_final = cotangents
    b, _, h, _ = q.shape
    dq, dk, dv, dbeta, dg, ds0 = kernels.backward(
        q, k, v, beta, seg, saved, do.astype(v.dtype), ds_final.reshape(b * h, *ds_final.shape[2:]),
        scale=scale, chunk=chunk, dg_dtype=jnp.float32 if g_dtype is None else g_dtype.dtype,
        interpret=interpret)
    return dq, dk, dv, dbeta, dg, ds0.reshape(ds_final.shape), None

  op.defvjp(op_fwd, op_bwd)
  return op


def run_padded(op, q, k, v, scalars, *, s0, segment_ids, chunk_size):
  """Pads T of [B, T, H, *] inputs to a multiple of the chunk (zeros; segment ids repeat the
  last id), casts the per-token scalars (a tuple of [B, T, H], entries may be None) to float32,
  keeps a per-dimension decay [B, T, H, K] in its dtype (the kernels read it so: a bf16 one costs
  no float32 copy each way), runs `op(q, k, v, *scalars, s0, seg)` and returns (o [B, T, H, V],
  final state)."""
  t = q.shape[1]
  pad = num_chunks(t, chunk_size) * chunk_size - t
  padded = lambda x: x if x is None or pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  as_read = lambda x: x if x.ndim == 4 else x.astype(jnp.float32)
  scalars = tuple(None if x is None else padded(as_read(x)) for x in scalars)
  seg = None
  if segment_ids is not None:
    seg = segment_ids.astype(jnp.int32)
    seg = seg if pad == 0 else jnp.pad(seg, [(0, 0), (0, pad)], mode="edge")
  o, s_final = op(padded(q), padded(k), padded(v), *scalars, s0, seg)
  return o[:, :t], s_final
