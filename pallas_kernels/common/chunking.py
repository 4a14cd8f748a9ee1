"""Padding, chunk reshapes and segment masks shared by every chunked form.

Shape legend: B batch, T time, H heads, K key width, V value width,
N number of chunks, C chunk size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def num_chunks(t: int, chunk_size: int) -> int:
  return -(-t // chunk_size)


def to_chunks(x_BTH_, chunk_size: int):
  """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding T up to N * C.

  Zero keys, values, decays and betas leave the state untouched, so padding
  never changes outputs or the final state.
  """
  b, t, h = x_BTH_.shape[:3]
  n = num_chunks(t, chunk_size)
  pad = [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x_BTH_.ndim - 2)
  x = jnp.pad(x_BTH_, pad)
  x = x.reshape(b, n, chunk_size, h, *x_BTH_.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x_BHNC_, t: int):
  """[B, H, N, C, ...] -> [B, T, H, ...], dropping the padding."""
  b, h, n, c = x_BHNC_.shape[:4]
  x = jnp.moveaxis(x_BHNC_, 1, 3).reshape(b, n * c, h, *x_BHNC_.shape[4:])
  return x[:, :t]


def segment_chunks(segment_ids_BT, b: int, t: int, h: int, chunk_size: int):
  """Segment ids per chunk and the id each chunk's incoming state belongs to.

  Returns `seg_BHNC` (padding repeats the last id, so it never starts a
  segment) and `seg_prev_BHN`: the id of the token before the chunk; for the
  first chunk the first token's own id, so `initial_state` feeds the first
  segment only.
  """
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((b, t), jnp.int32)
  n = num_chunks(t, chunk_size)
  seg = jnp.pad(segment_ids_BT.astype(jnp.int32), [(0, 0), (0, n * chunk_size - t)], mode="edge")
  seg_BNC = seg.reshape(b, n, chunk_size)
  prev_BN = jnp.concatenate([seg_BNC[:, :1, 0], seg_BNC[:, :-1, -1]], axis=1)
  seg_BHNC = jnp.broadcast_to(seg_BNC[:, None], (b, h, n, chunk_size))
  prev_BHN = jnp.broadcast_to(prev_BN[:, None], (b, h, n))
  return seg_BHNC, prev_BHN


def continues_BT(segment_ids_BT, b: int, t: int):
  """1.0 where a token continues the previous token's segment, else 0.0.

  Token 0 always continues (it reads `initial_state`).
  """
  if segment_ids_BT is None:
    return jnp.ones((b, t), jnp.float32)
  same = segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]
  return jnp.concatenate([jnp.ones((b, 1), bool), same], axis=1).astype(jnp.float32)


def segment_runs(segment_ids_BT):
  """The ids renumbered by run (0, 1, 2, ... at every change), so that masks may compare ids: an
  id that comes back after another one ([5, 7, 5]) starts a new segment, as the scan has it."""
  changed_BT = jnp.concatenate([jnp.zeros_like(segment_ids_BT[:, :1], bool),
                                segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  return jnp.cumsum(changed_BT, axis=1, dtype=jnp.int32)


def chunk_masks(seg_C, seg_prev):
  """Masks of one chunk, built from ids so no -inf ever enters a cumsum.

  in_C: token is still in the segment of the incoming state.
  out_C: token is in the segment of the chunk's last token (feeds the outgoing state).
  causal_CC: s <= t and both in one segment.
  """
  c = seg_C.shape[0]
  in_C = seg_C == seg_prev
  out_C = seg_C == seg_C[-1]
  causal_CC = (seg_C[:, None] == seg_C[None, :]) & jnp.tril(jnp.ones((c, c), bool))
  return in_C, out_C, causal_CC


def masked_exp(x, mask):
  """exp(x) where mask, else exactly 0, with a finite gradient everywhere."""
  return jnp.exp(jnp.where(mask, x, -jnp.inf))



def run_chunked(op, q, k, v, gates, *, s0, segment_ids, chunk_size):
  """Pads and chunks [B, T, H, *] inputs, runs `op(q, k, v, gates, s0, seg, seg_prev)` on
  [B, H, N, C, *] chunks, and returns (o [B, T, H, V], final state)."""
  b, t, h, _ = q.shape
  seg, prev = segment_chunks(segment_ids, b, t, h, chunk_size)
  chunked = lambda x: to_chunks(x, chunk_size)
  o, s_final = op(chunked(q), chunked(k), chunked(v), tuple(map(chunked, gates)), s0, seg, prev)
  return from_chunks(o, t), s_final


def matmul_precision(input_dtype):
  """Full float32 matmuls for float32 inputs; for bf16 inputs the accelerator's fast float32
  path (TF32 on GPUs), whose rounding is below the inputs' own."""
  return jax.lax.Precision.HIGHEST if input_dtype == jnp.float32 else jax.lax.Precision.DEFAULT
