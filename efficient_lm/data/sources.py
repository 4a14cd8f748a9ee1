"""Readers that turn files into lists of documents (strings), with clear errors.

Formats: plain text (one document, or documents split on blank lines), jsonl (one document per
line, the `text` field), parquet / arrow (a `text` column; needs pyarrow, imported lazily), and
WikiText (documents start at top-level ` = Title = ` headings).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterable

FORMATS = ("text", "jsonl", "parquet", "arrow", "wikitext")


class DataError(ValueError):
  """A user-facing problem with the data: missing file, empty file, bad encoding or format."""


def expand_paths(path: str | Iterable[str]) -> list[str]:
  """A path, a glob, a comma-separated list or a sequence of those -> sorted existing files."""
  specs = [path] if isinstance(path, str) else list(path)
  specs = [p.strip() for s in specs for p in s.split(",") if p.strip()]
  if not specs:
    raise DataError("no data path given (set data.path)")
  out: list[str] = []
  for spec in specs:
    spec = os.path.expanduser(spec)
    if any(ch in spec for ch in "*?["):
      matches = sorted(glob.glob(spec))
      if not matches:
        raise DataError(f"data path pattern {spec!r} matches no files")
      out.extend(matches)
    elif os.path.isdir(spec):
      files = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                     if os.path.isfile(os.path.join(spec, f)))
      if not files:
        raise DataError(f"data directory {spec!r} holds no files")
      out.extend(files)
    elif os.path.isfile(spec):
      out.append(spec)
    else:
      raise DataError(f"data file not found: {spec!r} (working directory {os.getcwd()!r})")
  return out


def read_utf8(path: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise DataError(f"data file {path!r} is empty")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    raise DataError(
        f"data file {path!r} is not valid UTF-8: byte {raw[e.start]:#04x} at offset {e.start} "
        f"(line {line}); re-encode it as UTF-8") from None


def read_text(path: str, split_on_blank_lines: bool = False) -> list[str]:
  text = read_utf8(path)
  if not split_on_blank_lines:
    return [text]
  docs = [d for d in re.split(r"\n\s*\n", text) if d.strip()]
  return docs


def read_jsonl(path: str, field: str = "text") -> list[str]:
  text = read_utf8(path)
  docs = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or field not in obj:
      raise DataError(f"{path}:{n}: JSON object has no {field!r} field")
    if not isinstance(obj[field], str):
      raise DataError(f"{path}:{n}: field {field!r} is not a string")
    if obj[field]:
      docs.append(obj[field])
  if not docs:
    raise DataError(f"data file {path!r} holds no non-empty {field!r} documents")
  return docs


def _pyarrow():
  try:
    import pyarrow  # noqa: F401
    import pyarrow.parquet  # noqa: F401
  except ImportError:
    raise DataError("reading parquet/arrow files needs pyarrow: pip install pyarrow") from None
  return pyarrow


def read_parquet(path: str, field: str = "text") -> list[str]:
  pa = _pyarrow()
  if os.path.getsize(path) == 0:
    raise DataError(f"data file {path!r} is empty")
  try:
    if path.endswith((".arrow", ".feather", ".ipc")):
      try:
        table = pa.ipc.open_file(path).read_all()
      except pa.ArrowInvalid:
        table = pa.ipc.open_stream(path).read_all()
    else:
      columns = pa.parquet.read_schema(path).names
      if field not in columns:
        raise DataError(f"{path!r} has no column {field!r} (columns: {columns})")
      table = pa.parquet.read_table(path, columns=[field])
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f"cannot read {path!r} as parquet/arrow: {e}") from None
  if field not in table.column_names:
    raise DataError(f"{path!r} has no column {field!r} (columns: {table.column_names})")
  docs = [d for d in table.column(field).to_pylist() if d]
  if not docs:
    raise DataError(f"data file {path!r} holds no non-empty {field!r} documents")
  return docs


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def read_wikitext(path: str) -> list[str]:
  """WikiText (raw or tokenised `<unk>` form): a new article starts at each ` = Title = ` line."""
  text = read_utf8(path)
  docs, cur = [], []
  for line in text.splitlines(keepends=True):
    if _WIKI_TITLE.match(line.rstrip("\n")) and any(l.strip() for l in cur):
      docs.append("".join(cur))
      cur = []
    cur.append(line)
  if any(l.strip() for l in cur):
    docs.append("".join(cur))
  return docs


def read_documents(fmt: str, path, field: str = "text",
                   split_on_blank_lines: bool = False) -> list[str]:
  """All documents of all files named by `path`, in file order."""
  if fmt not in FORMATS:
    raise DataError(f"unknown data format {fmt!r}; one of {FORMATS}")
  docs: list[str] = []
  for p in expand_paths(path):
    if fmt == "text":
      docs += read_text(p, split_on_blank_lines)
    elif fmt == "jsonl":
      docs += read_jsonl(p, field)
    elif fmt in ("parquet", "arrow"):
      docs += read_parquet(p, field)
    else:
      docs += read_wikitext(p)
  return docs
