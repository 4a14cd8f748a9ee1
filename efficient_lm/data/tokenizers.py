"""Tokenisers: raw UTF-8 bytes, characters (vocabulary from the training text), HF `tokenizers` JSON.

All three share one small interface: `encode(str) -> np.int32 array`, `decode(ids) -> str`,
`vocab_size`, `eos_id` (or None), and `to_json()` / `tokenizer_from_json()` so a run's workdir
holds everything `elm generate` needs to turn ids back into text.
"""
from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int | None

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def to_json(self) -> dict: ...


class ByteTokenizer:
  """UTF-8 bytes; vocabulary 256, no special tokens (documents are separated by segment ids)."""

  vocab_size = 256
  eos_id = None

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

  def to_json(self) -> dict:
    return {"kind": "bytes"}


class CharTokenizer:
  """One id per distinct character of the training text, in sorted order (nanoGPT's char level)."""

  eos_id = None

  def __init__(self, chars: Sequence[str]):
    self.chars = list(chars)
    if not self.chars:
      raise ValueError("CharTokenizer needs a non-empty vocabulary (the training text is empty).")
    self._index = {c: i for i, c in enumerate(self.chars)}
    self.vocab_size = len(self.chars)

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    return cls(sorted(set(text)))

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.fromiter((self._index[c] for c in text), dtype=np.int32, count=len(text))
    except KeyError as e:
      raise ValueError(
          f"character {e.args[0]!r} is not in the character vocabulary built from the training "
          f"text ({self.vocab_size} characters)") from None

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < self.vocab_size)

  def to_json(self) -> dict:
    return {"kind": "chars", "chars": "".join(self.chars)}


class HFTokenizer:
  """Any HF `tokenizers` JSON file (e.g. the GPT-NeoX-20B BPE)."""

  def __init__(self, path: str):
    import tokenizers

    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self.path = os.path.abspath(path)
    self._tok = tokenizers.Tokenizer.from_file(self.path)
    self.vocab_size = self._tok.get_vocab_size()
    eos = None
    for name in ("<|endoftext|>", "</s>", "<eos>", "[SEP]"):
      eos = self._tok.token_to_id(name)
      if eos is not None:
        break
    self.eos_id = eos

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts))]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids])

  def to_json(self) -> dict:
    return {"kind": "hf", "path": self.path}


def make_tokenizer(spec: str, train_text: str | None = None) -> Tokenizer:
  """`spec` is "bytes", "chars" (needs the training text) or a path to a `tokenizers` JSON file."""
  if spec == "bytes":
    return ByteTokenizer()
  if spec == "chars":
    if train_text is None:
      raise ValueError('tokenizer "chars" builds its vocabulary from the training text; '
                       "this data source has none")
    return CharTokenizer.from_text(train_text)
  if spec.endswith(".json"):
    return HFTokenizer(spec)
  raise ValueError(f'unknown tokenizer {spec!r}: use "bytes", "chars" or a path to a '
                   "HF tokenizers .json file")


def tokenizer_from_json(d: dict) -> Tokenizer:
  kind = d.get("kind")
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "chars":
    return CharTokenizer(list(d["chars"]))
  if kind == "hf":
    return HFTokenizer(d["path"])
  raise ValueError(f"unknown tokenizer description {d!r}")


def save_tokenizer(tok: Tokenizer, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(tok.to_json(), f, ensure_ascii=False)


def load_tokenizer(path: str) -> Tokenizer:
  with open(path, encoding="utf-8") as f:
    return tokenizer_from_json(json.load(f))
