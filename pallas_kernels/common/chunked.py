"""The chunked algorithm shared by both recurrence families, with its custom VJP.

Each family reduces one chunk to `ChunkTerms`; then for an incoming state S

    X     = U - W S                  (X = U = V for GLA, which has no W)
    O     = Qe S + P X
    S_out = diag(decay) S + Kd^T X

The forward scans over chunks, each step batched over (B, H) and done with
matmuls, and keeps only the state entering each chunk. The backward scans the
chunks in reverse: it recomputes one chunk from its stored state and pulls the
output and state gradients back through it, which yields the chunk's input
gradients and the gradient of the state entering it. Peak memory is one chunk's
work plus one state per chunk, never one state per token.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.common.chunking import matmul_precision

class ChunkTerms(NamedTuple):
  """One chunk's terms (float32); scale is already folded into qe and p."""
  qe_CK: jax.Array     # q * exp(b), zero after a segment start
  p_CC: jax.Array      # intra-chunk scores, causal and segment-masked
  kd_CK: jax.Array     # k * exp(b_last - b), zero before the last segment's start
  decay_K: jax.Array   # exp(b_last), zero if the chunk starts a new segment
  u_CV: jax.Array      # values (GLA) or T V (delta rule)
  w_CK: Optional[jax.Array]  # T (k * exp(b)) (delta rule) or None (GLA)


def chunk_step(t: ChunkTerms, s_KV, precision):
  """(O, S_out) of one chunk from its terms and incoming state."""
  dot = lambda a, b: jnp.dot(a, b, precision=precision)
  x_CV = t.u_CV if t.w_CK is None else t.u_CV - dot(t.w_CK, s_KV)
  o_CV = dot(t.qe_CK, s_KV) + dot(t.p_CC, x_CV)
  s_KV = t.decay_K[:, None] * s_KV + dot(t.kd_CK.T, x_CV)
  return o_CV, s_KV


def chunk_forward(chunk_terms, scale, q, k, v, gates, seg, prev, s_KV):
  """One chunk of any family: (O, S_out)."""
  return chunk_step(chunk_terms(q, k, v, gates, seg, prev, scale), s_KV, matmul_precision(q.dtype))


def chunk_vjp(chunk_terms, scale, q, k, v, gates, seg, prev, s_KV, do_CV, ds_KV):
  """Pulls (dO, dS_out) back through one chunk: (dq, dk, dv, dgates, dS_in)."""
  f = lambda q, k, v, gates, s: chunk_forward(chunk_terms, scale, q, k, v, gates, seg, prev, s)
  _, vjp = jax.vjp(f, q, k, v, gates, s_KV)
  return vjp((do_CV.astype(jnp.float32), ds_KV))


def _chunk_major(tree):
  """[B, H, N, ...] -> [N, B, H, ...]: lax.scan walks the leading axis."""
  return jax.tree.map(lambda a: jnp.moveaxis(a, 2, 0), tree)


def _batch_major(a):
  return jnp.moveaxis(a, 0, 2)


def make_chunked_op(chunk_terms: Callable[..., ChunkTerms]):
  """Builds `op(scale, q, k, v, gates, s0, seg, seg_prev) -> (o, s_final)`.

  Inputs are chunked, `[B, H, N, C, ...]`; `gates` is a tuple of per-token
  arrays the family's `chunk_terms(q, k, v, gates, seg, seg_prev, scale)`
  understands. Outputs: `o` in v's dtype, the final state in float32.
  """

  def over_bh(f):
    return jax.vmap(jax.vmap(f))

  def forward(scale, q, k, v, gates, s0, seg, prev):
    def step(s_BHKV, xs):
      o, s_next = over_bh(functools.partial(chunk_forward, chunk_terms, scale))(*xs, s_BHKV)
      return s_next, (o.astype(v.dtype), s_BHKV)

    s_final, (o, s_in) = jax.lax.scan(step, s0, _chunk_major((q, k, v, gates, seg, prev)))
    return _batch_major(o), s_final, s_in

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def op(scale, q, k, v, gates, s0, seg, prev):
    o, s_final, _ = forward(scale, q, k, v, gates, s0, seg, prev)
    return o, s_final

  def op_fwd(scale, q, k, v, gates, s0, seg, prev):
    o, s_final, s_in = forward(scale, q, k, v, gates, s0, seg, prev)
    return (o, s_final), (q, k, v, gates, seg, prev, s_in)

  def op_bwd(scale, residuals, cotangents):
    q, k, v, gates, seg, prev, s_in = residuals
    do, ds_final = cotangents

    def step(ds_BHKV, xs):
      dq, dk, dv, dgates, ds_in = over_bh(functools.partial(chunk_vjp, chunk_terms, scale))(*xs, ds_BHKV)
      return ds_in, (dq, dk, dv, dgates)

    xs = _chunk_major((q, k, v, gates, seg, prev)) + (s_in, _chunk_major(do))
    ds0, grads = jax.lax.scan(step, ds_final, xs, reverse=True)
    dq, dk, dv, dgates = jax.tree.map(_batch_major, grads)
    return dq, dk, dv, dgates, ds0, None, None

  op.defvjp(op_fwd, op_bwd)
  return op
