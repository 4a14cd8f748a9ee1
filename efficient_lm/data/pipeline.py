"""The data pipeline: a `DataConfig` -> tokeniser + train/eval Grain datasets.

Order is a pure function of (seed, step): the source is shuffled with a per-epoch reseed, repeated
forever and cut into global batches of `global_batch` examples; process p of n reads rows
[p*B/n, (p+1)*B/n) of every global batch, so shards are disjoint, cover the batch, and the global
batch does not depend on the number of processes. The training iterator is a Grain
`DatasetIterator`: `get_state()` / `set_state()` (and Orbax via `grain.checkpoint`) resume it
exactly.
"""
from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np

from efficient_lm.data import sources as src_lib
from efficient_lm.data.mqar import MQARSource
from efficient_lm.data.packing import PackedSource, concat_documents, split_stream
from efficient_lm.data.tokenizers import CharTokenizer, HFTokenizer, Tokenizer, make_tokenizer

SOURCES = ("mqar",) + src_lib.FORMATS
_ENDLESS = 2**62


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "mqar"            # mqar | text | jsonl | parquet | arrow | wikitext
  path: str = ""                  # file, directory, glob or comma-separated list
  eval_path: str = ""             # held-out files; empty: the last `eval_fraction` of `path`
  eval_fraction: float = 0.1
  field: str = "text"             # jsonl / parquet column holding the document text
  split_on_blank_lines: bool = False  # plain text: one document per blank-line-separated block
  tokenizer: str = "bytes"        # bytes | chars | path/to/tokenizer.json
  add_eos: bool = True            # append the tokeniser's EOS (if it has one) to each document
  seq_len: int = 128
  shuffle: bool = True
  seed: int = 0
  num_threads: int = 2            # Grain read threads (prefetch)
  # MQAR (experiments.md 1)
  mqar_vocab_size: int = 8192
  mqar_num_kv_pairs: int = 16
  mqar_power_a: float = 0.01
  mqar_train_examples: int = 0    # 0: a fresh example for every index
  mqar_eval_examples: int = 1000


class Data:
  """Tokeniser, train source and eval source built from a `DataConfig`."""

  def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None = None):
    self.cfg = cfg
    if cfg.source not in SOURCES:
      raise src_lib.DataError(f"unknown data.source {cfg.source!r}; one of {SOURCES}")
    if cfg.source == "mqar":
      self.tokenizer = None
      self.vocab_size = cfg.mqar_vocab_size
      kw = dict(vocab_size=cfg.mqar_vocab_size, seq_len=cfg.seq_len,
                num_kv_pairs=cfg.mqar_num_kv_pairs, power_a=cfg.mqar_power_a, seed=cfg.seed)
      self.train_source = MQARSource(split=0, num_examples=cfg.mqar_train_examples, **kw)
      self.eval_source = MQARSource(split=1, num_examples=cfg.mqar_eval_examples, **kw)
      return
    docs = src_lib.read_documents(cfg.source, cfg.path, cfg.field, cfg.split_on_blank_lines)
    eval_docs = (src_lib.read_documents(cfg.source, cfg.eval_path, cfg.field,
                                        cfg.split_on_blank_lines) if cfg.eval_path else None)
    if tokenizer is None:
      tokenizer = make_tokenizer(cfg.tokenizer, "".join(docs) if cfg.tokenizer == "chars" else None)
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size
    eos = tokenizer.eos_id if cfg.add_eos else None
    tokens, starts = concat_documents(self._encode(docs), eos)
    if eval_docs is not None:
      eval_tokens, eval_starts = concat_documents(self._encode(eval_docs), eos)
    else:
      if not 0.0 < cfg.eval_fraction < 1.0:
        raise src_lib.DataError("data.eval_fraction must be in (0, 1) when data.eval_path is empty")
      at = int(round(tokens.size * (1.0 - cfg.eval_fraction)))
      (tokens, starts), (eval_tokens, eval_starts) = split_stream(tokens, starts, at)
    self.train_source = PackedSource(tokens, starts, cfg.seq_len)
    self.eval_source = PackedSource(eval_tokens, eval_starts, cfg.seq_len)
    if len(self.train_source) == 0:
      raise src_lib.DataError(
          f"training data {cfg.path!r} has {tokens.size} tokens: fewer than one sequence of "
          f"seq_len={cfg.seq_len} + 1")
    self.num_train_tokens = int(tokens.size)

  def _encode(self, docs):
    if isinstance(self.tokenizer, HFTokenizer):
      return self.tokenizer.encode_batch(docs)
    try:
      return [self.tokenizer.encode(d) for d in docs]
    except ValueError as e:
      raise src_lib.DataError(str(e)) from None

  # ---------------------------------------------------------------- iterators
  def train_dataset(self, global_batch: int, process_index: int = 0,
                    process_count: int = 1) -> grain.IterDataset:
    return host_batches(self.train_source, global_batch, process_index, process_count,
                        seed=self.cfg.seed if self.cfg.shuffle else None,
                        num_threads=self.cfg.num_threads)

  def train_iterator(self, global_batch: int, process_index: int = 0,
                     process_count: int = 1) -> grain.DatasetIterator:
    return iter(self.train_dataset(global_batch, process_index, process_count))

  def eval_batches(self, global_batch: int, num_batches: int = 0, process_index: int = 0,
                   process_count: int = 1) -> list[dict]:
    """The held-out set in a fixed order (no shuffle); `num_batches=0`: all full batches."""
    n_full = len(self.eval_source) // global_batch
    if n_full == 0:
      raise src_lib.DataError(
          f"held-out data has {len(self.eval_source)} sequences of seq_len={self.cfg.seq_len}: "
          f"fewer than one eval batch of {global_batch}")
    n = min(n_full, num_batches) if num_batches > 0 else n_full
    ds = host_batches(self.eval_source, global_batch, process_index, process_count, seed=None,
                      repeat=False, num_threads=0)
    out = []
    for b in ds:
      if len(out) == n:
        break
      out.append(b)
    return out


def host_batches(source, global_batch: int, process_index: int, process_count: int, *,
                 seed: int | None, repeat: bool = True, num_threads: int = 0) -> grain.IterDataset:
  """Global batch b = stream[b*B:(b+1)*B]; this process gets its contiguous block of rows."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  local = global_batch // process_count
  stream = grain.MapDataset.source(source)
  if seed is not None:
    stream = stream.shuffle(seed=seed)
  if repeat:
    stream = stream.repeat()  # reseeds the shuffle each epoch
    n = _ENDLESS
  else:
    n = (len(source) // global_batch) * local
  offset = process_index * local

  def pick(k: int):
    b, i = divmod(k, local)
    return stream[b * global_batch + offset + i]

  ds = grain.MapDataset.range(n).map(pick).batch(local, drop_remainder=True)
  opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, 2 * num_threads))
  return ds.to_iter_dataset(opts)
