"""The one place where `impl` is resolved to a form of the recurrence, per platform."""
from __future__ import annotations

import jax

IMPLS = ("auto", "scan", "chunk", "pallas")


def resolve_impl(impl: str, available: tuple[str, ...]) -> str:
  """Maps `impl` to one of the forms an op has.

  "auto" takes the Pallas kernels on GPU and TPU when the op has them and the
  chunked XLA form otherwise; the scan is never chosen automatically, since
  its gradient stores one state per token.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    on_accelerator = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
    return "pallas" if on_accelerator and "pallas" in available else "chunk"
  if impl not in available:
    raise ValueError(f"impl: {impl!r} is not available for this op (available: {available})")
  return impl
