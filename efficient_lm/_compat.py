"""THE one place efficient_lm touches jax APIs that differ between supported versions.

Supported: jax 0.10 (oldest, CI leg on Python 3.11) through the newest release (0.12.x today, CI
leg on Python 3.12). Checked differences:

  * `jax.make_mesh`: the first parameter is `axis_shapes` in 0.10 and `axis_sizes` in 0.12, so it
    is passed positionally; `axis_types` exists in both (`jax.sharding.AxisType`).
  * `jax.distributed.initialize`: 0.12 adds mTLS keywords; keywords a version lacks are dropped
    here (with a clear error when the caller needs one that is missing).
  * CPU cross-process collectives: `jax_cpu_collectives_implementation` ("gloo" | "mpi") in both
    0.10 and 0.12; older releases spelled it `jax_cpu_enable_gloo_collectives=True`.
  * the `with mesh:` context lives in the private `jax._src.mesh.thread_resources`; newer code
    uses `jax.sharding.get_abstract_mesh()`; both are tried.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import jax
import numpy as np

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
MIN_JAX = (0, 10)


def _auto_axis_types(n: int):
  axis_type = getattr(jax.sharding, "AxisType", None)
  return None if axis_type is None else (axis_type.Auto,) * n


def make_mesh(shape: Sequence[int], axis_names: Sequence[str],
              devices: Sequence[Any] | None = None):
  """`jax.make_mesh` over all devices (topology-aware order), else a plain `Mesh`."""
  from jax.sharding import Mesh

  types = _auto_axis_types(len(shape))
  kw = {} if types is None else {"axis_types": types}
  if devices is None or len(devices) == len(jax.devices()):
    return jax.make_mesh(tuple(shape), tuple(axis_names), devices=devices, **kw)
  return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names), **kw)


def current_mesh():
  """The mesh of an enclosing `with mesh:` / `jax.set_mesh` context, or None."""
  try:
    from jax._src import mesh as mesh_lib
    m = mesh_lib.thread_resources.env.physical_mesh
    if not m.empty:
      return m
  except Exception:  # noqa: BLE001
    pass
  try:
    m = jax.sharding.get_abstract_mesh()
    if m is not None and not m.empty:
      return m
  except Exception:  # noqa: BLE001
    pass
  return None


def set_cpu_collectives(impl: str = "gloo") -> None:
  """Cross-process collectives for the CPU backend (must run before the backend starts)."""
  values = getattr(jax.config, "values", {})
  if "jax_cpu_collectives_implementation" in values:
    jax.config.update("jax_cpu_collectives_implementation", impl)
  elif "jax_cpu_enable_gloo_collectives" in values and impl == "gloo":
    jax.config.update("jax_cpu_enable_gloo_collectives", True)
  else:
    raise RuntimeError(f"jax {jax.__version__} has no CPU collectives option for {impl!r}")


def distributed_is_initialized() -> bool:
  fn = getattr(jax.distributed, "is_initialized", None)
  if fn is not None:
    return bool(fn())
  from jax._src import distributed
  return distributed.global_state.client is not None


def distributed_initialize(**kwargs) -> None:
  """`jax.distributed.initialize(**kwargs)`, dropping None-valued keywords and refusing a
  non-None keyword this jax version does not know."""
  params = inspect.signature(jax.distributed.initialize).parameters
  kw = {}
  for k, v in kwargs.items():
    if v is None:
      continue
    if k not in params:
      raise TypeError(f"jax {jax.__version__}: jax.distributed.initialize has no {k!r} option")
    kw[k] = v
  jax.distributed.initialize(**kw)


def detected_cluster() -> str | None:
  """Name of the cluster environment jax's own auto-detection sees (e.g. "SlurmCluster",
  "GceTpuCluster", "OmpiCluster"), or None. Uses the private `jax._src.clusters` registry."""
  try:
    from jax._src import clusters
    types = clusters.ClusterEnv._cluster_types
  except Exception:  # noqa: BLE001 - registry moved: no auto-detection, explicit flags still work
    return None
  for env in types:
    try:
      if env.is_env_present():
        return env.__name__
    except Exception:  # noqa: BLE001
      continue
  return None
