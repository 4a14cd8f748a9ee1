"""Decode-state accounting. The caches themselves are plain pytrees built by each layer's
`init_cache` (see `LM.init_cache`):
- recurrent mixers (Rodimus, DeltaNet, GLA, linear attention, DiJiang): a float32 state `[B, H, K, V]` plus
  short-conv caches of the last `conv_size - 1` inputs: constant in context length;
- sliding-window attention and SW-SKA: a ring of the last `w` keys and values: constant;
- global attention: keys and values `[B, max_len, heads, head_dim]`: grows with context.
"""
from __future__ import annotations

import jax
from flax import nnx


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def decode_state_bytes(cfg, batch_size: int, max_len: int) -> int:
  """Bytes of the decode cache for `cfg`, computed with eval_shape (nothing allocated)."""
  from efficient_lm.models.lm import LM
  model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  return tree_bytes(jax.eval_shape(lambda: model.init_cache(batch_size, max_len)))


def decode_state_growth(cfg, lengths=(1024, 2048)) -> tuple[int, float]:
  """(fixed bytes, bytes per extra token of context) for one sequence."""
  a, b = (decode_state_bytes(cfg, 1, n) for n in lengths)
  per_token = (b - a) / (lengths[1] - lengths[0])
  return int(a - per_token * lengths[0]), per_token
