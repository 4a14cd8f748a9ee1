"""The one place where `impl` is resolved to a form of the recurrence, per platform."""
from __future__ import annotations

import os

import jax

from pallas_kernels import _compat

IMPLS = ("auto", "scan", "chunk", "pallas")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def resolve_impl(impl: str, available: tuple[str, ...], *, op: str | None = None, dtype=None,
                 kd: int | None = None, vd: int | None = None, chunk_size: int | None = None) -> str:
  """Maps `impl` to one of the forms an op has.

  "auto" takes the Pallas form where the fused GPU kernels run `op` (a FUSED_BY_DEFAULT key; None
  for an op without fused kernels) and the chunked XLA form everywhere else. Measured on the H200 (bf16, experiments/results/kernels/h200/): the fused
  delta rule runs fwd+bwd in 1.78 ms against the chunked form's 17.42 ms at 8x2048x16x128 (one
  process, run 9), and a DeltaNet-340m-shaped train step (8 layers, batch 8 x 2048) takes 46.2 ms
  against 127.6 ms (peak memory 10.2 vs 10.7 GB). The state-pass Pallas path (TPU) is faster
  than chunk as one op but needs 3-7x its temporary memory, and ran out of memory inside a train
  step on the H100, so "auto" leaves those on chunk. The scan is never chosen automatically: its
  gradient stores one state per token.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    fused = op is not None and "pallas" in available and _fused_gpu_kernels_apply(op, dtype, kd, vd, chunk_size)
    return "pallas" if fused else "chunk"
  if impl not in available:
    raise ValueError(f"impl: {impl!r} is not available for this op (available: {available})")
  return impl


def _fused_gpu_kernels_apply(op, dtype, kd, vd, chunk_size) -> bool:
  if jax.default_backend() not in _GPU_PLATFORMS or _gpu_backend(dtype, kd, vd, chunk_size)[0] != "triton":
    return False
  return _triton_tile_problem(kd, vd, chunk_size) is None and fused_kernels("triton", op)


def pallas_backend(dtype=None, kd: int | None = None, vd: int | None = None,
                   chunk_size: int | None = None) -> str:
  """The kernel backend for impl="pallas": Triton (or Mosaic GPU) on GPU, Mosaic on TPU,
  interpret mode on CPU. dtype, kd, vd and chunk_size (of the op's inputs) decide whether the
  Mosaic GPU kernels can take the op.

  On GPU, PALLAS_KERNELS_GPU=auto (the default) takes Triton, which hands an op whose fused Mosaic
  GPU kernels measured faster to them (`takes_mosaic_gpu`); =triton takes Triton
  alone; =mosaic_gpu takes the Mosaic GPU kernels where they apply (Hopper or
  newer, 16-bit inputs, C, K, V multiples of 64; the state-pass kernels, or the fused ones for
  MOSAIC_GPU_FUSED) and Triton elsewhere. Triton is the default backend: on the H200 the fused
  Triton kernels ran the delta rule's fwd+bwd 2.5x faster than the
  Mosaic GPU state-pass path (3.9-4.1 vs 10.1 ms at 8x2048x16x128). A jax without the Triton
  backend (deprecated since 0.11) takes the Mosaic GPU kernels where they apply. On CPU,
  PALLAS_KERNELS_INTERPRET=tpu runs the TPU kernels under TPU interpret semantics and
  =mosaic_gpu the Mosaic GPU kernels under GPU interpret mode (jax >= 0.11) instead of the
  generic interpreter.
  """
  platform = jax.default_backend()
  if platform in _GPU_PLATFORMS:
    backend, why = _gpu_backend(dtype, kd, vd, chunk_size)
    if backend is None:
      raise ValueError(f"impl='pallas': {why}; impl='chunk' runs on any GPU")
    return backend
  if platform == "tpu":
    return "tpu"
  mode = os.environ.get("PALLAS_KERNELS_INTERPRET", "generic")
  if mode not in ("generic", "tpu", "mosaic_gpu"):
    raise ValueError(f"PALLAS_KERNELS_INTERPRET: expected 'generic', 'tpu' or 'mosaic_gpu', got {mode!r}")
  if mode == "mosaic_gpu":
    why = _mosaic_gpu_unsupported(dtype, kd, vd, chunk_size)
    if why is not None:
      raise ValueError(f"PALLAS_KERNELS_INTERPRET=mosaic_gpu: {why}")
    return "mosaic_gpu_interpret"
  return {"generic": "interpret", "tpu": "tpu_interpret"}[mode]


def _gpu_backend(dtype, kd, vd, chunk_size) -> tuple[str | None, str | None]:
  """(backend, None), or (None, why not) when this jax has no Triton backend and the Mosaic GPU
  kernels cannot take the op."""
  choice = _gpu_choice()
  if choice in ("auto", "triton") and _compat.has_triton_backend():
    return "triton", None
  why = _mosaic_gpu_unsupported(dtype, kd, vd, chunk_size) if _hopper() else \
      "the Mosaic GPU kernels need sm90 (Hopper: wgmma)"
  if why is None:
    return "mosaic_gpu", None
  if _compat.has_triton_backend():
    return "triton", None
  return None, f"this jax has no Pallas Triton backend and {why}"


def _gpu_choice() -> str:
  choice = os.environ.get("PALLAS_KERNELS_GPU", "auto")
  if choice not in ("auto", "triton", "mosaic_gpu"):
    raise ValueError(f"PALLAS_KERNELS_GPU: expected 'auto', 'triton' or 'mosaic_gpu', got {choice!r}")
  return choice


# The ops whose fused Mosaic GPU kernels beat the Triton ones on Hopper, forward and backward together,
# measured in one process (bf16, 8x2048x16x128, experiments/mosaic_check.py, experiments/NOTES.md
# sessions 13-15). GLA with a scalar decay (H100 run 35): fwd+bwd 0.74 ms on the Mosaic GPU kernels
# against Triton's 0.87, the forward alone 0.25 against 0.29. Mixing backends per direction lost: the
# Mosaic GPU forward before the Triton backward took 0.92 ms (run 35). The delta rule with T solved
# chunk-parallel (`delta_kernels_mosaic_gpu.PRESOLVE`, H100 run 40): fwd+bwd 1.29 ms against Triton's
# 1.91, gated 1.66 against 2.25 (run 41, 1x32768x16x128: 4.48 against 6.27); taken in bf16 only, the
# dtype timed and tested. Under PALLAS_KERNELS_GPU=auto (the default) these ops run the Mosaic GPU
# kernels. GLA with a per-dimension decay stays on Triton: its fused Mosaic GPU kernels took 8.67 ms
# fwd+bwd against Triton's 2.31 (H100 run 42), and after session 17's changes 0.93-1.09x Triton's
# time over the four per-dimension anchors (run 47: 2.53 against 2.33 ms at 8x2048x16x128).
MOSAIC_GPU_FASTER = ("gla", "delta_rule", "gated_delta_rule")


def takes_mosaic_gpu(op: str, backend: str, dtype, kd: int, vd: int, chunk_size: int,
                     segments: bool = False) -> bool:
  """Whether `op` (a FUSED_BY_DEFAULT key) runs its fused Mosaic GPU kernels while `backend` is
  Triton's: a MOSAIC_GPU_FASTER op (the delta rule in bf16 only), on sm90 under
  PALLAS_KERNELS_GPU=auto, where the Mosaic GPU kernels take the inputs (shared memory, with
  segment ids or not, included)."""
  if op not in MOSAIC_GPU_FASTER or backend != "triton" or _gpu_choice() != "auto" or not _hopper() or \
      _mosaic_gpu_unsupported(dtype, kd, vd, chunk_size) is not None:
    return False
  # jax.experimental.pallas.mosaic_gpu is heavy: imported only here.
  from pallas_kernels.common import (  # noqa: PLC0415
      chunk_kernels_mosaic_gpu, delta_kernels_mosaic_gpu, gla_perdim_kernels_mosaic_gpu)
  if op == "gla":
    return chunk_kernels_mosaic_gpu.fused_unsupported(chunk_size, kd) is None
  if op == "gla_perdim":
    return gla_perdim_kernels_mosaic_gpu.fused_unsupported(chunk_size, kd, dtype) is None
  # The delta-rule kernels are tested (interpret mode) and timed in bf16 only: float16 stays on Triton.
  return jax.numpy.dtype(dtype) == jax.numpy.bfloat16 and delta_kernels_mosaic_gpu.fused_unsupported(
      dtype, chunk_size, kd, op == "gated_delta_rule", segments) is None


def _hopper() -> bool:
  """sm90 only: the Mosaic GPU kernels use wgmma, which later architectures (sm100+) lack."""
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  return 9.0 <= float(capability) < 10.0


def _mosaic_gpu_unsupported(dtype, kd, vd, chunk_size) -> str | None:
  if dtype is None:
    return "the op's dtype and sizes are needed to pick the Mosaic GPU kernels"
  from pallas_kernels.common import state_pass_mosaic_gpu  # noqa: PLC0415 (jax.experimental.pallas.mosaic_gpu is heavy)
  return state_pass_mosaic_gpu.supports(dtype, chunk_size, kd, vd)


# Whether impl="pallas" takes the fully fused GPU kernels (`chunk_kernels_triton`) or the
# state-pass kernels over XLA-built terms, per op: the faster on the H200 (bf16, 8x2048x16x128,
# fwd+bwd, experiments/results/kernels/h200/): delta rule fused 3.9 ms vs 10.3; gated delta rule
# 5.9 vs 10.9; scalar-decay GLA 1.8 vs 2.4. The fused path also needs 1.5-3x less temporary
# memory (833 vs 1921 MB for the delta rule). PALLAS_KERNELS_FUSED=0 takes the state-pass path
# everywhere, =1 the fused one wherever it exists.
# GLA with a per-dimension decay ("gla_perdim"): fused 4.12 ms against the state-pass path's 10.11,
# temp memory 768 against 4058 MB (H200 runs 11 and 13).
FUSED_BY_DEFAULT = {"delta_rule": True, "gated_delta_rule": True, "gla": True, "gla_perdim": True}


# The ops with fused kernels on the Mosaic GPU backend (`chunk_kernels_mosaic_gpu`: GLA with a
# scalar decay or none; `gla_perdim_kernels_mosaic_gpu`: GLA with a per-dimension decay;
# `delta_kernels_mosaic_gpu`: the delta rule, gated by a scalar decay or not; each where shared
# memory fits, which the callers check).
MOSAIC_GPU_FUSED = ("gla", "gla_perdim", "delta_rule", "gated_delta_rule")


def fused_kernels(backend: str, op: str) -> bool:
  """Whether `op` (a FUSED_BY_DEFAULT key) runs the fused kernels on `backend`: on the Triton
  backend and its generic interpreter, and for MOSAIC_GPU_FUSED on the Mosaic GPU backend and its
  interpret mode; PALLAS_KERNELS_FUSED is read at trace time."""
  if backend not in ("triton", "interpret") and not (
      backend in ("mosaic_gpu", "mosaic_gpu_interpret") and op in MOSAIC_GPU_FUSED):
    return False
  mode = os.environ.get("PALLAS_KERNELS_FUSED", "auto")
  if mode not in ("auto", "0", "1"):
    raise ValueError(f"PALLAS_KERNELS_FUSED: expected 'auto', '0' or '1', got {mode!r}")
  return FUSED_BY_DEFAULT[op] if mode == "auto" else mode == "1"


def check_pallas_shapes(backend: str, kd: int, vd: int, chunk_size: int) -> None:
  """Triton tiles must be powers of two of at least 16 (tensor-core dot shapes)."""
  problem = _triton_tile_problem(kd, vd, chunk_size) if backend == "triton" else None
  if problem is not None:
    raise ValueError(problem)


def _triton_tile_problem(kd: int, vd: int, chunk_size: int) -> str | None:
  for name, size in (("K (q.shape[-1])", kd), ("V (v.shape[-1])", vd), ("chunk_size", chunk_size)):
    if size < 16 or size & (size - 1):
      return f"{name}: the GPU kernels need a power of two >= 16, got {size}"
  return None
