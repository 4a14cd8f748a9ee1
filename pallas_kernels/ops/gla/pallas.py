"""GLA as Pallas kernels.

On GPU (and the generic interpreter) GLA can run every stage as a kernel (`pallas_chunked.make_fused_op`)
when `dispatch.fused_kernels` picks it; on the Mosaic GPU backend (and its interpret mode) so can
GLA with a scalar decay or none (`chunk_kernels_mosaic_gpu.fused_gla`) and with a per-dimension
decay (`gla_perdim_kernels_mosaic_gpu.fused_gla_perdim`), segment ids or not, where the kernels
fit shared memory.
Otherwise, and always on TPU, the passes over chunks are kernels over XLA-built terms
(`pallas_chunked.make_pallas_op`). On Hopper the Triton path may hand GLA to the fused Mosaic GPU
kernels, where `dispatch.takes_mosaic_gpu` measured them faster.
"""
from __future__ import annotations

import functools

from pallas_kernels.common import chunk_kernels_mosaic_gpu, gla_perdim_kernels_mosaic_gpu
from pallas_kernels.common.chunking import run_chunked
from pallas_kernels.common.pallas_chunked import make_fused_op, make_pallas_op, run_padded
from pallas_kernels.dispatch import check_pallas_shapes, fused_kernels, pallas_backend, takes_mosaic_gpu
from pallas_kernels.ops.gla.chunk import gla_chunk_terms, gla_gates

_gla_pallas = make_pallas_op(gla_chunk_terms)
_gla_fused = make_fused_op()
_MOSAIC_GPU = ("mosaic_gpu", "mosaic_gpu_interpret")


def _fused_op_name(g):
  return "gla_perdim" if g is not None and g.ndim == 4 else "gla"


def gla_fused(q, k, v, g, *, scale, s0, segment_ids, chunk_size, interpret):
  """The fused kernels on [B, T, H, *] inputs; g None, [B, T, H] or [B, T, H, K]."""
  return run_padded(functools.partial(_gla_fused, scale, chunk_size, interpret), q, k, v, (None, g),
                    s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)


def gla_fused_mosaic_gpu(q, k, v, g, *, scale, s0, chunk_size, interpret, segment_ids=None):
  """The fused Mosaic GPU kernels on [B, T, H, *] inputs; g None, [B, T, H] or [B, T, H, K];
  segment_ids [B, T] or None."""
  fused = gla_perdim_kernels_mosaic_gpu.fused_gla_perdim if _fused_op_name(g) == "gla_perdim" else \
      chunk_kernels_mosaic_gpu.fused_gla
  op = lambda q, k, v, g, s0, seg: fused(scale, chunk_size, interpret, q, k, v, g, s0, seg)
  return run_padded(op, q, k, v, (g,), s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)


def gla_state_pass(q, k, v, g, *, scale, s0, segment_ids, chunk_size, backend):
  """The state-pass kernels over XLA-built chunk terms, on a fixed backend."""
  return run_chunked(functools.partial(_gla_pallas, scale, backend), q, k, v, gla_gates(g, q),
                     s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)


def _mosaic_gpu_fused_unsupported(g, chunk_size, kd, dtype):
  if _fused_op_name(g) == "gla_perdim":
    return gla_perdim_kernels_mosaic_gpu.fused_unsupported(chunk_size, kd, dtype)
  return chunk_kernels_mosaic_gpu.fused_unsupported(chunk_size, kd, dtype)


def gla_pallas(q, k, v, g, *, scale, s0, segment_ids, chunk_size):
  backend = pallas_backend(q.dtype, q.shape[-1], v.shape[-1], chunk_size)
  check_pallas_shapes(backend, q.shape[-1], v.shape[-1], chunk_size)
  op = _fused_op_name(g)
  if fused_kernels(backend, op):
    if backend in _MOSAIC_GPU:
      if _mosaic_gpu_fused_unsupported(g, chunk_size, q.shape[-1], q.dtype) is None:
        return gla_fused_mosaic_gpu(q, k, v, g, scale=scale, s0=s0, chunk_size=chunk_size,
                                    interpret=backend == "mosaic_gpu_interpret", segment_ids=segment_ids)
    elif takes_mosaic_gpu(op, backend, q.dtype, q.shape[-1], v.shape[-1], chunk_size):
      return gla_fused_mosaic_gpu(q, k, v, g, scale=scale, s0=s0, chunk_size=chunk_size, interpret=False,
                                  segment_ids=segment_ids)
    else:
      return gla_fused(q, k, v, g, scale=scale, s0=s0, segment_ids=segment_ids, chunk_size=chunk_size,
                       interpret=backend == "interpret")
  return gla_state_pass(q, k, v, g, scale=scale, s0=s0, segment_ids=segment_ids, chunk_size=chunk_size,
                        backend=backend)
