"""Every jax-version and Pallas-backend difference lives here, nowhere else (jax 0.10 - 0.12)."""
from __future__ import annotations

import os

import jax

from jax.experimental.pallas import tpu as pltpu

try:  # deprecated since jax 0.11 and due to be removed; without it GPUs take the Mosaic GPU kernels
  from jax.experimental.pallas import triton as pltriton
except ImportError:
  pltriton = None


def has_triton_backend() -> bool:
  return pltriton is not None


def triton_params(num_warps: int, num_stages: int):
  if pltriton is None:
    raise RuntimeError("this jax has no Pallas Triton backend (jax.experimental.pallas.triton)")
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(dimension_semantics):
  return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def tpu_interpret():
  return pltpu.InterpretParams()


def tpu_vmem(shape, dtype):
  return pltpu.VMEM(shape, dtype)


_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def avoid_cpu_scheduler_deadlock() -> None:
  """jaxlib 0.10's CPU runtime deadlocks at random (idle process, never returns) on
  programs with several independent loops, e.g. a chunked VJP under jit: about half of
  the runs of one test program hung, none did with the concurrency-optimised scheduler
  off (12 of 12). XLA reads XLA_FLAGS when the CPU client starts, so this only helps
  when it runs before jax's first computation, which importing this package does.
  """
  if jax.__version_info__ >= (0, 11) or _CPU_SCHEDULER_FLAG.split("=")[0] in os.environ.get("XLA_FLAGS", ""):
    return
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULER_FLAG}".strip()
