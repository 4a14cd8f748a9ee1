"""GLA as Pallas kernels.

GLA with a scalar or no decay can run every stage as a kernel (`pallas_chunked.make_fused_op`,
GPU and the generic interpreter, when `dispatch.fused_kernels` picks it). Otherwise, and always
for a per-dimension decay or on TPU, the passes over chunks are kernels over XLA-built terms
(`pallas_chunked.make_pallas_op`).
"""
from __future__ import annotations

import functools

from pallas_kernels.common.chunking import run_chunked
from pallas_kernels.common.pallas_chunked import make_fused_op, make_pallas_op, run_padded
from pallas_kernels.dispatch import check_pallas_shapes, fused_kernels, pallas_backend
from pallas_kernels.ops.gla.chunk import gla_chunk_terms, gla_gates

_gla_pallas = make_pallas_op(gla_chunk_terms)
_gla_fused = make_fused_op()


def gla_fused(q, k, v, g, *, scale, s0, segment_ids, chunk_size, interpret):
  """The fused kernels on [B, T, H, *] inputs; g None or [B, T, H] (scalar decay)."""
  if g is not None and g.ndim != 3:
    raise ValueError(f"g: the fused GLA kernels take a scalar decay [B, T, H], got shape {g.shape}")
  return run_padded(functools.partial(_gla_fused, scale, chunk_size, interpret), q, k, v, (None, g),
                    s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)


def gla_state_pass(q, k, v, g, *, scale, s0, segment_ids, chunk_size, backend):
  """The state-pass kernels over XLA-built chunk terms, on a fixed backend."""
  return run_chunked(functools.partial(_gla_pallas, scale, backend), q, k, v, gla_gates(g, q),
                     s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)


def gla_pallas(q, k, v, g, *, scale, s0, segment_ids, chunk_size):
  backend = pallas_backend(q.dtype, q.shape[-1], v.shape[-1], chunk_size)
  check_pallas_shapes(backend, q.shape[-1], v.shape[-1], chunk_size)
  if fused_kernels(backend, "gla") and (g is None or g.ndim == 3):
    return gla_fused(q, k, v, g, scale=scale, s0=s0, segment_ids=segment_ids, chunk_size=chunk_size,
                     interpret=backend == "interpret")
  return gla_state_pass(q, k, v, g, scale=scale, s0=s0, segment_ids=segment_ids, chunk_size=chunk_size,
                        backend=backend)
