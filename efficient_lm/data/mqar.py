"""Synthetic multi-query associative recall (Zoology's `multiquery_ar`), generated on the fly.

A sequence of `seq_len` inputs holds `num_kv_pairs` key-value pairs (keys from the lower half
of the vocabulary, values from the upper half, id 0 reserved), then queries that repeat every key
at power-law distributed gaps (p(gap) ~ a * gap^(a-1)); the rest is random filler. Only the token
after each queried key counts (loss_mask 1), and its target is that key's value. Example i of seed
s depends on (s, split, i) only, so any window of the stream can be regenerated exactly.
"""
from __future__ import annotations

import numpy as np


class MQARSource:
  """Random-access Grain source of MQAR examples; `num_examples=0` means effectively unbounded."""

  def __init__(self, *, vocab_size: int = 8192, seq_len: int = 256, num_kv_pairs: int = 16,
               power_a: float = 0.01, seed: int = 0, split: int = 0, num_examples: int = 0,
               random_non_queries: bool = True):
    if vocab_size < 4 * num_kv_pairs + 2:
      raise ValueError(f"MQAR vocab_size {vocab_size} too small for {num_kv_pairs} pairs")
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2
    if space < num_kv_pairs:
      raise ValueError(f"MQAR seq_len {seq_len} too short for {num_kv_pairs} key-value pairs "
                       f"(needs seq_len >= {4 * num_kv_pairs})")
    self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
    self.seed, self.split, self.random_non_queries = seed, split, random_non_queries
    self._len = num_examples if num_examples > 0 else 2**40
    gaps = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * gaps ** (power_a - 1)
    self._p = p / p.sum()
    self._space = space

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < self._len:
      raise IndexError(i)
    rng = np.random.default_rng([self.seed, self.split, i])
    n, T, V = self.num_kv_pairs, self.seq_len, self.vocab_size
    half = V // 2
    keys = rng.choice(np.arange(1, half), size=n, replace=False)
    values = rng.choice(np.arange(half, V), size=n, replace=False)
    context = 2 * n
    seq = np.zeros(T + 1, np.int64)
    seq[0:context:2], seq[1:context:2] = keys, values
    gaps = rng.choice(self._space, size=n, replace=False, p=self._p)
    seq[context + 2 * gaps] = keys
    labels = np.full(T + 1, -1, np.int64)
    labels[context + 2 * gaps + 1] = values
    inputs, targets = seq[:-1].copy(), labels[1:]
    if self.random_non_queries:
      zero = inputs == 0
      inputs[zero] = rng.integers(1, V, size=int(zero.sum()))
    mask = targets >= 0
    return {
        "inputs": inputs.astype(np.int32),
        "targets": np.where(mask, targets, 0).astype(np.int32),
        "segment_ids": np.ones(T, np.int32),
        "loss_mask": mask.astype(np.float32),
    }
