"""Data: Grain sources (text, jsonl, parquet/arrow, WikiText, synthetic MQAR), tokenisers, packing."""
from efficient_lm.data.mqar import MQARSource
from efficient_lm.data.packing import PackedSource, concat_documents
from efficient_lm.data.sources import DataError, read_documents
from efficient_lm.data.tokenizers import (ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer,
                                          load_tokenizer, make_tokenizer, save_tokenizer)

__all__ = [
    "ByteTokenizer", "CharTokenizer", "Data", "DataConfig", "DataError", "HFTokenizer",
    "MQARSource", "PackedSource", "Tokenizer", "concat_documents", "host_batches",
    "load_tokenizer", "make_tokenizer", "read_documents", "save_tokenizer",
]


def __getattr__(name):
  # The Grain pipeline loads on first use: the sources, tokenisers and MQAR work without grain
  # (the GPU images lack it; experiments/ use them directly).
  if name in ("Data", "DataConfig", "host_batches"):
    from efficient_lm.data import pipeline
    return getattr(pipeline, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
