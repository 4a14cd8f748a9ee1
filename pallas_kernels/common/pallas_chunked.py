"""The chunked algorithm with its sequential state passes as Pallas kernels.

Chunk-parallel work runs in XLA over all chunks at once: the family's
`chunk_terms` in the forward, and in the backward the per-chunk VJP given the
stored incoming state and the state gradient from the backward kernel. The two
passes over chunks (states forward, state gradients in reverse) are the Pallas
kernels of the backend module: `state_pass_triton` on GPU, `state_pass_tpu` on TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import state_pass_tpu, state_pass_triton
from pallas_kernels.common.chunked import ChunkTerms, chunk_vjp

# backend name -> (kernel module, interpret argument)
BACKENDS = {
    "triton": (state_pass_triton, False),
    "tpu": (state_pass_tpu, False),
    "interpret": (state_pass_triton, True),
    "tpu_interpret": (state_pass_tpu, True),
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
