"""GLA in chunked form (pure JAX), differentiated chunk by chunk (see common/chunked.py).

Intra-chunk scores need exp(b_t - b_s) with b the in-chunk cumulative log decay.
A scalar decay builds that C x C matrix directly. A per-dimension decay cannot
be factorised as (q e^b)(k e^-b)^T, which overflows once b passes about -80, so
the chunk is split into sub-chunks: diagonal sub-blocks use the exact
[c, c, K] exponent, off-diagonal ones a reference point at the sub-block
boundary that keeps both factors <= 1.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels.common.chunked import ChunkTerms, make_chunked_op
from pallas_kernels.common.chunking import chunk_masks, masked_exp, matmul_precision, run_chunked

SUB_CHUNK = 16


def _scores_scalar(q_CK, k_CK, b_C, causal_CC, prec):
  return jnp.dot(q_CK, k_CK.T, precision=prec) * masked_exp(b_C[:, None] - b_C[None, :], causal_CC)


def _scores_per_dim(q_CK, k_CK, b_CK, causal_CC, prec):
  c, kd = q_CK.shape
  sub = min(SUB_CHUNK, c)
  n = c // sub
  q_nsK, k_nsK, b_nsK = (x.reshape(n, sub, kd) for x in (q_CK, k_CK, b_CK))
  mask_nsns = causal_CC.reshape(n, sub, n, sub)

  diag_mask = mask_nsns[jnp.arange(n), :, jnp.arange(n), :]
  e_nttK = masked_exp(b_nsK[:, :, None, :] - b_nsK[:, None, :, :], diag_mask[..., None])
  diag_ntt = jnp.einsum("itd,isd,itsd->its", q_nsK, k_nsK, e_nttK, precision=prec)

  ref_nK = jnp.concatenate([jnp.zeros((1, kd), b_CK.dtype), b_nsK[:-1, -1, :]])
  q_ref = q_nsK * jnp.exp(b_nsK - ref_nK[:, None, :])
  below = (jnp.arange(n)[:, None] > jnp.arange(n)[None, :])[:, :, None, None]
  k_ref = k_nsK[None] * masked_exp(ref_nK[:, None, None, :] - b_nsK[None], below)
  off_nsns = jnp.einsum("itd,ijsd->itjs", q_ref, k_ref, precision=prec)

  # A select, not a multiply by eye(n): the multiply form corrupted memory under jit in jax 0.10.2 (CPU).
  scores = jnp.where(jnp.eye(n, dtype=bool)[:, None, :, None], diag_ntt[:, :, None, :], off_nsns)
  return jnp.where(mask_nsns, scores, 0.0).reshape(c, c)


def gla_chunk_terms(q_CK, k_CK, v_CV, gates, seg_C, seg_prev, scale) -> ChunkTerms:
  (g,) = gates
  prec = matmul_precision(q_CK.dtype)
  q_CK, k_CK, v_CV, g = (x.astype(jnp.float32) for x in (q_CK, k_CK, v_CV, g))
  in_C, out_C, causal_CC = chunk_masks(seg_C, seg_prev)
  b = jnp.cumsum(g, axis=0)
  if g.ndim == 1:
    p_CC = _scores_scalar(q_CK, k_CK, b, causal_CC, prec)
    b_CK = b[:, None]
  else:
    p_CC = _scores_per_dim(q_CK, k_CK, b, causal_CC, prec)
    b_CK = b
  return ChunkTerms(
      qe_CK=scale * q_CK * jnp.exp(b_CK) * in_C[:, None],
      p_CC=scale * p_CC,
      kd_CK=k_CK * jnp.exp(b_CK[-1] - b_CK) * out_C[:, None],
      decay_K=jnp.broadcast_to(jnp.exp(b_CK[-1]) * in_C[-1], q_CK.shape[-1:]),
      u_CV=v_CV,
      w_CK=None,
  )


_gla_chunked = make_chunked_op(gla_chunk_terms)


def gla_gates(g, q):
  """GLA's gate tuple; no decay is a zero scalar log decay."""
  return (jnp.zeros(q.shape[:3], jnp.float32) if g is None else g,)


def gla_chunk(q, k, v, g, *, scale, s0, segment_ids, chunk_size):
  """Chunked GLA on [B, T, H, *] inputs; g None, [B,T,H] or [B,T,H,K]."""
  return run_chunked(functools.partial(_gla_chunked, scale), q, k, v, gla_gates(g, q),
                     s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)
