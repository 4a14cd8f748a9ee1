"""Packing a token stream into fixed-length training examples with `segment_ids`.

Documents are concatenated into one flat stream; example i is the window
`stream[i*T : i*T + T + 1]`. Every example is a dict of int32/float32 arrays:

  inputs_T       tokens fed to the model
  targets_T      the next token at each position
  segment_ids_T  1, 2, ... one id per document piece inside the window (the model masks across them)
  loss_mask_T    1.0 where the target belongs to the same document as the input, else 0.0

so nothing of one document is attended to, or predicted from, another.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def concat_documents(docs_tokens: Sequence[np.ndarray], eos_id: int | None = None):
  """-> (tokens, doc_starts): one int32 stream and the offset where each document starts."""
  pieces, starts, pos = [], [], 0
  eos = np.asarray([eos_id], np.int32) if eos_id is not None else None
  for t in docs_tokens:
    t = np.asarray(t, np.int32)
    if t.size == 0:
      continue
    starts.append(pos)
    pieces.append(t)
    pos += t.size
    if eos is not None:
      pieces.append(eos)
      pos += 1
  if not pieces:
    return np.zeros((0,), np.int32), np.zeros((0,), np.int64)
  return np.concatenate(pieces), np.asarray(starts, np.int64)


def split_stream(tokens: np.ndarray, starts: np.ndarray, at: int):
  """Cut a stream at token `at`: -> (head_tokens, head_starts), (tail_tokens, tail_starts)."""
  head_starts = starts[starts < at]
  tail_starts = starts[starts >= at] - at
  if at < tokens.size and (tail_starts.size == 0 or tail_starts[0] != 0):
    tail_starts = np.concatenate([[0], tail_starts])  # the cut document goes on as a new one
  return (tokens[:at], head_starts), (tokens[at:], tail_starts.astype(np.int64))


class PackedSource:
  """Random-access source of packed windows over a document stream (a Grain data source)."""

  def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int):
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    self.tokens = np.asarray(tokens, np.int32)
    self.doc_starts = np.asarray(doc_starts, np.int64)
    if self.doc_starts.size == 0 or self.doc_starts[0] != 0:
      self.doc_starts = np.concatenate([[0], self.doc_starts]).astype(np.int64)
    self.seq_len = seq_len
    self._len = max(0, (self.tokens.size - 1) // seq_len)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < self._len:
      raise IndexError(i)
    T = self.seq_len
    s = i * T
    window = self.tokens[s:s + T + 1]
    doc = np.searchsorted(self.doc_starts, np.arange(s, s + T + 1), side="right") - 1
    return {
        "inputs": window[:-1].copy(),
        "targets": window[1:].copy(),
        "segment_ids": (doc[:-1] - doc[0] + 1).astype(np.int32),
        "loss_mask": (doc[1:] == doc[:-1]).astype(np.float32),
    }

  def __repr__(self) -> str:
    return f"PackedSource(tokens={self.tokens.size}, seq_len={self.seq_len}, windows={self._len})"
