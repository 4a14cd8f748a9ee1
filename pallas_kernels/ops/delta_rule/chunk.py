"""The (gated) delta rule in chunked WY/UT form (pure JAX), differentiated chunk by chunk.

Per chunk, with b the in-chunk cumulative log decay and Gamma_ts = exp(b_t - b_s):
A = strict_lower(diag(beta) (K K^T * Gamma)), T = (I + A)^-1 diag(beta),
W = T (K * exp(b)), U = T V; the shared driver in common/chunked.py does the rest.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common.chunked import ChunkTerms, make_chunked_op
from pallas_kernels.common.chunking import chunk_masks, masked_exp, matmul_precision, run_chunked

def delta_rule_chunk_terms(q_CK, k_CK, v_CV, gates, seg_C, seg_prev, scale) -> ChunkTerms:
  prec = matmul_precision(q_CK.dtype)
  beta_C, g_C = (x.astype(jnp.float32) for x in gates)
  q_CK, k_CK, v_CV = (x.astype(jnp.float32) for x in (q_CK, k_CK, v_CV))
  c, kd = k_CK.shape
  in_C, out_C, causal_CC = chunk_masks(seg_C, seg_prev)
  b_C = jnp.cumsum(g_C)
  gamma_CC = masked_exp(b_C[:, None] - b_C[None, :], causal_CC)

  a_CC = jnp.tril(beta_C[:, None] * jnp.dot(k_CK, k_CK.T, precision=prec) * gamma_CC, -1)
  ke_CK = k_CK * (jnp.exp(b_C) * in_C)[:, None]
  rhs = beta_C[:, None] * jnp.concatenate([ke_CK, v_CV], axis=1)
  wu = jax.scipy.linalg.solve_triangular(
      jnp.eye(c, dtype=jnp.float32) + a_CC, rhs, lower=True, unit_diagonal=True)
  return ChunkTerms(
      qe_CK=scale * q_CK * (jnp.exp(b_C) * in_C)[:, None],
      p_CC=scale * jnp.dot(q_CK, k_CK.T, precision=prec) * gamma_CC,
      kd_CK=k_CK * (jnp.exp(b_C[-1] - b_C) * out_C)[:, None],
      decay_K=jnp.broadcast_to(jnp.exp(b_C[-1]) * in_C[-1], (kd,)),
      u_CV=wu[:, kd:],
      w_CK=wu[:, :kd],
  )


_delta_rule_chunked = make_chunked_op(delta_rule_chunk_terms)


def delta_rule_gates(beta, g):
  """The delta rule's gate tuple; ungated is a zero log decay."""
  return (beta, jnp.zeros(beta.shape, jnp.float32) if g is None else g)


def delta_rule_chunk(q, k, v, beta, g, *, scale, s0, segment_ids, chunk_size):
  """Chunked (gated) delta rule on [B, T, H, *] inputs; g None or [B,T,H]."""
  return run_chunked(functools.partial(_delta_rule_chunked, scale), q, k, v, delta_rule_gates(beta, g),
                     s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)
