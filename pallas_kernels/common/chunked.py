"""The chunked algorithm shared by both recurrence families, with its custom VJP.

Each family reduces one chunk to `ChunkTerms`; then for an incoming state S

    X     = U - W S                  (X = U = V for GLA, which has no W)
    O     = Qe S + P X
    S_out = diag(decay) S + Kd^T X

The forward runs one sequential pass over chunks for the states and computes
every chunk's output in parallel. The backward runs the transposed pass in
reverse for the state gradients (dS_in = A^T dS_out + Qe^T dO - W^T P^T dO with
A = diag(decay) - Kd^T W), then differentiates every chunk in parallel with
the state gradient it receives. Only per-chunk states are kept, never per-token
ones.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.common.chunking import vmap_bhn


class ChunkTerms(NamedTuple):
  """One chunk's terms (float32); scale is already folded into qe and p."""
  qe_CK: jax.Array     # q * exp(b), zero after a segment start
  p_CC: jax.Array      # intra-chunk scores, causal and segment-masked
  kd_CK: jax.Array     # k * exp(b_last - b), zero before the last segment's start
  decay_K: jax.Array   # exp(b_last), zero if the chunk starts a new segment
  u_CV: jax.Array      # values (GLA) or T V (delta rule)
  w_CK: Optional[jax.Array]  # T (k * exp(b)) (delta rule) or None (GLA)


def _einsum(spec, a, b):
  return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def chunk_values(t: ChunkTerms, s_KV):
  if t.w_CK is None:
    return t.u_CV
  return t.u_CV - _einsum("...ck,...kv->...cv", t.w_CK, s_KV)


def chunk_output(t: ChunkTerms, s_KV, x_CV):
  return _einsum("...ck,...kv->...cv", t.qe_CK, s_KV) + _einsum("...cs,...sv->...cv", t.p_CC, x_CV)


def next_state(t: ChunkTerms, s_KV, x_CV):
  return t.decay_K[..., :, None] * s_KV + _einsum("...ck,...cv->...kv", t.kd_CK, x_CV)


def _over_chunks(tree):
  """[B, H, N, ...] -> [N, B, H, ...] for lax.scan."""
  return jax.tree.map(lambda a: jnp.moveaxis(a, 2, 0), tree)


def make_chunked_op(chunk_terms: Callable[..., ChunkTerms]):
  """Builds `op(scale, q, k, v, gates, s0, seg, seg_prev) -> (o, s_final)`.

  Inputs are chunked, `[B, H, N, C, ...]`; `gates` is a tuple of per-token
  arrays the family's `chunk_terms(q, k, v, gates, seg, seg_prev, scale)`
  understands. Outputs: `o` in v's dtype, the final state in float32.
  """

  def all_terms(scale, q, k, v, gates, seg, prev):
    return vmap_bhn(lambda *a: chunk_terms(*a, scale))(q, k, v, gates, seg, prev)

  def forward(scale, q, k, v, gates, s0, seg, prev):
    terms = all_terms(scale, q, k, v, gates, seg, prev)

    def state_step(s, t):
      return next_state(t, s, chunk_values(t, s)), s

    s_final, s_in_N = jax.lax.scan(state_step, s0, _over_chunks(terms))
    s_in = jnp.moveaxis(s_in_N, 0, 2)
    o = chunk_output(terms, s_in, chunk_values(terms, s_in))
    return o.astype(v.dtype), s_final, s_in

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
    do = do.astype(jnp.float32)
    terms = all_terms(scale, q, k, v, gates, seg, prev)

    pt_do = _einsum("...ts,...tv->...sv", terms.p_CC, do)
    from_output = _einsum("...ck,...cv->...kv", terms.qe_CK, do)
    if terms.w_CK is not None:
      from_output -= _einsum("...ck,...cv->...kv", terms.w_CK, pt_do)

    def grad_step(ds_out, xs):
      t, from_out = xs
      ds_in = t.decay_K[..., :, None] * ds_out + from_out
      if t.w_CK is not None:
        ds_in -= _einsum("...ck,...cv->...kv", t.w_CK, _einsum("...ck,...kv->...cv", t.kd_CK, ds_out))
      return ds_in, ds_out

    transition = terms._replace(qe_CK=None, p_CC=None, u_CV=None)
    ds0, ds_out_N = jax.lax.scan(
        grad_step, ds_final, _over_chunks((transition, from_output)), reverse=True)
    ds_out = jnp.moveaxis(ds_out_N, 0, 2)

    def chunk_grads(q, k, v, gates, seg, prev, s_in, do, ds_out):
      def one_chunk(q, k, v, gates):
        t = chunk_terms(q, k, v, gates, seg, prev, scale)
        x = chunk_values(t, s_in)
        return chunk_output(t, s_in, x), next_state(t, s_in, x)

      _, vjp = jax.vjp(one_chunk, q, k, v, gates)
      return vjp((do, ds_out))

    dq, dk, dv, dgates = vmap_bhn(chunk_grads)(q, k, v, gates, seg, prev, s_in, do, ds_out)
    return dq, dk, dv, dgates, ds0, None, None

  op.defvjp(op_fwd, op_bwd)
  return op
