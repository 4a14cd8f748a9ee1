"""Reading and writing checkpoint files: safetensors (a small reader/writer of the documented
format, no dependency), `pytorch_model*.bin` through torch when it is installed, and a model
directory (`config.json` + weights).

safetensors layout: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
raw little-endian tensor bytes (offsets relative to the end of the header).
"""
from __future__ import annotations

import json
import os
import pathlib

import ml_dtypes
import numpy as np

_FROM_ST = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_TO_ST = {v: k for k, v in _FROM_ST.items()}


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of one .safetensors file; arrays are read-only memory maps."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  metadata = header.pop("__metadata__", None) or {}
  has_data = os.path.getsize(path) > 8 + n
  buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if has_data else np.zeros(0, np.uint8)
  tensors = {}
  for name, info in header.items():
    if info["dtype"] not in _FROM_ST:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
    begin, end = info["data_offsets"]
    dtype = _FROM_ST[info["dtype"]]
    tensors[name] = np.reshape(buf[begin:end].view(dtype), tuple(info["shape"]))
  return tensors, metadata


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes `tensors` (names sorted, C order, little endian) with optional string metadata."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.asarray(tensors[name], order="C")   # (ascontiguousarray would make scalars 1-D)
    if a.dtype not in _TO_ST:
      raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    header[name] = {"dtype": _TO_ST[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)                      # the format pads the header to 8 bytes
  # Write beside and rename: arrays memory-mapped from an older file of the same name stay valid.
  tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)


def _torch_to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def read_torch_bin(path) -> dict[str, np.ndarray]:
  """A `pytorch_model.bin` state dict (needs torch; loaded with weights_only=True)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path}: reading .bin checkpoints needs torch (pip install torch)") from e
  state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
  return {k: _torch_to_numpy(v) for k, v in state.items()}


def read_checkpoint(directory) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, every tensor) from a Hugging Face style directory: all
  `*.safetensors` files (shards included), else all `pytorch_model*.bin` files."""
  d = pathlib.Path(directory)
  if not (d / "config.json").is_file():
    raise FileNotFoundError(f"{d}: no config.json")
  config = json.loads((d / "config.json").read_text())
  files = sorted(d.glob("*.safetensors"))
  tensors: dict[str, np.ndarray] = {}
  if files:
    for f in files:
      tensors.update(read_safetensors(f)[0])
  else:
    bins = sorted(d.glob("pytorch_model*.bin"))
    if not bins:
      raise FileNotFoundError(f"{d}: no *.safetensors or pytorch_model*.bin weights")
    for f in bins:
      tensors.update(read_torch_bin(f))
  return config, tensors
