"""The (gated) delta rule with its passes over chunks as Pallas kernels (see common/pallas_chunked.py)."""
from __future__ import annotations

import functools

from pallas_kernels.common.chunking import run_chunked
from pallas_kernels.common.pallas_chunked import make_pallas_op
from pallas_kernels.dispatch import check_pallas_shapes, pallas_backend
from pallas_kernels.ops.delta_rule.chunk import delta_rule_chunk_terms, delta_rule_gates

_delta_rule_pallas = make_pallas_op(delta_rule_chunk_terms)


def delta_rule_pallas(q, k, v, beta, g, *, scale, s0, segment_ids, chunk_size):
  backend = pallas_backend()
  check_pallas_shapes(backend, q.shape[-1], v.shape[-1], chunk_size)
  return run_chunked(functools.partial(_delta_rule_pallas, scale, backend), q, k, v,
                     delta_rule_gates(beta, g), s0=s0, segment_ids=segment_ids, chunk_size=chunk_size)
