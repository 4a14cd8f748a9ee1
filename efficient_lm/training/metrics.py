"""Run observability: `metrics.jsonl`, TensorBoard event files, a terminal progress line.

The TensorBoard writer is a small dependency-free encoder of the event-file format (TFRecord
framing with masked CRC32C around `Event{wall_time, step, summary{value{tag, simple_value}}}`
protos), so runs need neither TensorFlow nor tensorboardX; `tensorboard --logdir WORKDIR/tb` reads
them.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import IO

# ------------------------------------------------------------------ metrics.jsonl


def _clean(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return repr(v)  # "nan" / "inf": JSON has no such numbers
  return v


class JsonlWriter:
  """Appends one JSON object per line; `truncate_after(step)` drops lines of later steps (used
  on resume, so a restarted run's file holds each step once)."""

  def __init__(self, path: str):
    self.path = path
    self._f: IO | None = None

  def truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    keep = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          obj = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        if obj.get("step", 0) <= step:
          keep.append(json.dumps(obj) + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, record: dict) -> None:
    if self._f is None:
      self._f = open(self.path, "a", encoding="utf-8")
    self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
    self._f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(l) for l in f if l.strip()]


# ------------------------------------------------------------------ TensorBoard

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:
  return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict | None = None) -> bytes:
  msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) +
                     struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    msg += _field_bytes(5, summary)
  return msg


class TensorBoardWriter:

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.elm"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "wb")
    self._write(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._f.write(header + struct.pack("<I", _masked_crc(header)) + data +
                  struct.pack("<I", _masked_crc(data)))
    self._f.flush()

  def scalars(self, step: int, values: dict) -> None:
    values = {k: float(v) for k, v in values.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if values:
      self._write(_event(time.time(), int(step), scalars=values))

  def close(self) -> None:
    self._f.close()


def read_tensorboard_scalars(path: str) -> list[tuple[int, str, float]]:
  """Minimal reader of the files above (for tests): -> [(step, tag, value)]."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack_from("<Q", data, pos)
    body = data[pos + 12: pos + 12 + n]
    assert struct.unpack_from("<I", data, pos + 12 + n)[0] == _masked_crc(body), "bad crc"
    pos += 16 + n
    out.extend(_parse_event(body))
  return out


def _read_varint(b: bytes, i: int):
  shift = n = 0
  while True:
    c = b[i]
    i += 1
    n |= (c & 0x7F) << shift
    shift += 7
    if not c & 0x80:
      return n, i


def _fields(b: bytes):
  i = 0
  while i < len(b):
    key, i = _read_varint(b, i)
    num, wt = key >> 3, key & 7
    if wt == 0:
      v, i = _read_varint(b, i)
    elif wt == 1:
      v, i = b[i:i + 8], i + 8
    elif wt == 5:
      v, i = b[i:i + 4], i + 4
    else:
      n, i = _read_varint(b, i)
      v, i = b[i:i + n], i + n
    yield num, v


def _parse_event(b: bytes):
  step, out = 0, []
  for num, v in _fields(b):
    if num == 2:
      step = v
    elif num == 5:
      for _, val in _fields(v):
        tag, x = None, None
        for vn, vv in _fields(val):
          if vn == 1:
            tag = vv.decode()
          elif vn == 2:
            x = struct.unpack("<f", vv)[0]
        out.append((step, tag, x))
  return out


# ------------------------------------------------------------------ progress line


class Progress:
  """`step 120/200 [######    ] loss 1.234 12.3k tok/s ETA 0:31` on a terminal, else silent."""

  def __init__(self, total: int, start: int = 0, enabled: bool | None = None,
               stream: IO = sys.stderr):
    self.total, self.start = total, start
    self.stream = stream
    self.enabled = stream.isatty() if enabled is None else enabled
    self.t0 = time.time()

  def update(self, step: int, loss: float | None = None, tok_s: float | None = None) -> None:
    if not self.enabled:
      return
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    frac = step / max(self.total, 1)
    bar = "#" * int(20 * frac) + " " * (20 - int(20 * frac))
    parts = [f"step {step}/{self.total} [{bar}]"]
    if loss is not None:
      parts.append(f"loss {loss:.4f}")
    if tok_s is not None:
      parts.append(f"{tok_s / 1e3:.1f}k tok/s")
    if math.isfinite(eta):
      parts.append(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
    self.stream.write("\r" + " ".join(parts) + "\033[K")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled:
      self.stream.write("\n")
      self.stream.flush()
