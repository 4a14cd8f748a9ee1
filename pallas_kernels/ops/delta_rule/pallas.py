"""The (gated) delta rule as Pallas kernels.

On GPU (and the generic interpreter) either every stage is a kernel (`pallas_chunked.make_fused_op`)
or the passes over chunks are kernels over XLA-built terms (`pallas_chunked.make_pallas_op`), the
faster per op (`dispatch.fused_kernels`); on TPU always the latter. On the Mosaic GPU backend (and
its interpret mode), and on Hopper under the Triton backend where `dispatch.takes_mosaic_gpu`
measured them faster, every stage is a Mosaic GPU kernel, segment ids or not, where the kernels fit
shared memory (`delta_kernels_mosaic_gpu.fused_delta_rule`); otherwise the state-pass kernels run.
"""
from __future__ import annotations

import functools

from pallas_kernels.common import delta_kernels_mosaic_gpu
from pallas_kernels.common.chunking import run_chunked
from pallas_kernels.common.pallas_chunked import make_fused_op, make_pallas_op, run_padded
from pallas_kernels.dispatch import check_pallas_shapes, fused_kernels, pallas_backend, takes_mosaic_gpu
from pallas_kernels.ops.delta_rule.chunk import delta_rule_chunk_terms, delta_rule_gates

_delta_rule_pallas = make_pallas_op(delta_rule_chunk_terms)
_delta_rule_fused = make_fused_op()
_MOSAIC_GPU = ("mosaic_gpu", "mosaic_gpu_interpret")


def delta_rule_fused(q, k, v, beta, g, *, scale, s0, segment_ids, chunk_size, interpret):
  """The fused kernels on [B, T, H, *] inputs (interpret mode when `interpret`)."""
  return run_padded(functools.partial(_delta_rule_fused, scale, chunk_size, interpret), q, k, v, (beta, g),
                    s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)


def delta_rule_fused_mosaic_gpu(q, k, v, beta, g, *, scale, s0, segment_ids, chunk_size, interpret):
  """The fused Mosaic GPU kernels on [B, T, H, *] inputs; g None or [B, T, H]; segment_ids [B, T] or None."""
  op = lambda q, k, v, beta, g, s0, seg: delta_kernels_mosaic_gpu.fused_delta_rule(
      scale, chunk_size, interpret, q, k, v, beta, g, s0, seg)
  return run_padded(op, q, k, v, (beta, g), s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)


def delta_rule_state_pass(q, k, v, beta, g, *, scale, s0, segment_ids, chunk_size, backend):
  """The state-pass kernels over XLA-built chunk terms, on a fixed backend."""
  return run_chunked(functools.partial(_delta_rule_pallas, scale, backend), q, k, v,
                     delta_rule_gates(beta, g), s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)


def delta_rule_pallas(q, k, v, beta, g, *, scale, s0, segment_ids, chunk_size):
  backend = pallas_backend(q.dtype, q.shape[-1], v.shape[-1], chunk_size)
  check_pallas_shapes(backend, q.shape[-1], v.shape[-1], chunk_size)
  op = "delta_rule" if g is None else "gated_delta_rule"
  if fused_kernels(backend, op):
    if takes_mosaic_gpu(op, backend, q.dtype, q.shape[-1], v.shape[-1], chunk_size, segment_ids is not None):
      return delta_rule_fused_mosaic_gpu(q, k, v, beta, g, scale=scale, s0=s0, segment_ids=segment_ids,
                                         chunk_size=chunk_size, interpret=False)
    if backend not in _MOSAIC_GPU:
      return delta_rule_fused(q, k, v, beta, g, scale=scale, s0=s0, segment_ids=segment_ids,
                              chunk_size=chunk_size, interpret=backend == "interpret")
    if delta_kernels_mosaic_gpu.fused_unsupported(q.dtype, chunk_size, q.shape[-1], g is not None,
                                                  segment_ids is not None) is None:
      return delta_rule_fused_mosaic_gpu(q, k, v, beta, g, scale=scale, s0=s0, segment_ids=segment_ids,
                                         chunk_size=chunk_size, interpret=backend == "mosaic_gpu_interpret")
  return delta_rule_state_pass(q, k, v, beta, g, scale=scale, s0=s0, segment_ids=segment_ids,
                               chunk_size=chunk_size, backend=backend)
