"""THE one place that knows mesh axes.

Layers name their parameter dimensions with logical axes ("vocab", "embed", "heads", "kv", "mlp",
"experts", "state", "conv", None) and activations with ("batch", "length", "act_embed",
"act_heads", "act_mlp", "act_vocab"); the two tables below map them onto the mesh axes
`data`, `fsdp`, `tensor`. Everything else (the train loop, checkpoints, the CLI) asks this module
for shardings.

  data    pure data parallel: parameters replicated, the batch split
  fsdp    the batch split AND parameters/optimizer state split along their "embed" dimension
  tensor  Megatron-style: heads / mlp / vocab dimensions split
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efficient_lm import _compat

MESH_AXES = ("data", "fsdp", "tensor")

# logical parameter axis -> mesh axis (or a tuple of mesh axes, or None = replicated)
PARAM_RULES: dict[str | None, Any] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "experts": None,
    "state": None,
    "conv": None,
    None: None,
}

# logical activation axis -> mesh axis
ACTIVATION_RULES: dict[str | None, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    None: None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; one entry may be -1 ("the remaining devices")."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {cfg}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got {cfg}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {cfg}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

  Over several processes the device order is process-major (`jax.make_mesh` keeps each host's
  devices together), so the last axes (`tensor`, then `fsdp`) stay inside a host as long as
  they are no larger than its device count, and `data` spans hosts."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return _compat.make_mesh(shape, MESH_AXES, devices)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: dict | None = None) -> P:
  """Logical names -> PartitionSpec. With `shape` and `mesh`, a dimension the mesh axes do not
  divide stays replicated; a mesh axis is used at most once per array."""
  rules = PARAM_RULES if rules is None else rules
  if axes is None:
    return P()
  used: set[str] = set()
  out = []
  for d, name in enumerate(axes):
    if name not in rules:
      raise KeyError(f"logical axis {name!r} has no rule in efficient_lm.sharding "
                     f"(known: {sorted(k for k in rules if k)})")
    mesh_axes = rules[name]
    mesh_axes = () if mesh_axes is None else (
        (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    if mesh is not None:
      mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
      if shape is not None and mesh_axes:
        if shape[d] % math.prod(mesh.shape[a] for a in mesh_axes):
          mesh_axes = ()
    used.update(mesh_axes)
    out.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
  return P(*out)


def _logical_axes(variable) -> tuple | None:
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):
    if meta.get(key) is not None:
      return tuple(meta[key])
  return None


def param_specs(state) -> Any:
  """An nnx.State (abstract or concrete) -> the same tree of pure PartitionSpecs, mesh-free."""
  from flax import nnx

  return jax.tree.map(lambda v: logical_to_spec(_logical_axes(v)), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, mesh: Mesh) -> Any:
  """An nnx.State -> a pure-dict tree of NamedShardings (divisibility-aware)."""
  from flax import nnx

  def one(v):
    shape = getattr(v.get_value() if hasattr(v, "get_value") else v.value, "shape", ())
    return NamedSharding(mesh, logical_to_spec(_logical_axes(v), shape, mesh))

  return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch-major arrays: dim 0 over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + ("length",) * (ndim - 1), None, mesh,
                                             ACTIVATION_RULES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x, axes: Sequence[str | None], mesh: Mesh | None = None):
  """Activation sharding constraint by logical names; a no-op outside a mesh context."""
  if mesh is None:
    mesh = _current_mesh()
    if mesh is None:
      return x
  spec = logical_to_spec(axes, x.shape, mesh, ACTIVATION_RULES)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _current_mesh():
  return _compat.current_mesh()


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """Process-local numpy rows -> global jax arrays (works for one and many processes)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process job (all None: from the environment)."""
  coordinator_address: str | None = None   # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  cluster_detection: str | None = None      # e.g. "slurm", "gce_tpu"; None: jax auto-detects
  cpu_collectives: str = "gloo"             # CPU backend only: gloo | mpi
  initialization_timeout: int | None = None  # seconds to wait for all processes


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  return int(v) if v not in (None, "") else None


def distributed_from_env(env=None) -> DistributedConfig:
  """JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (and ELM_* aliases)."""
  env = os.environ if env is None else env

  def get(*names):
    for n in names:
      if env.get(n):
        return env[n]
    return None

  n, i = get("JAX_NUM_PROCESSES", "ELM_NUM_PROCESSES"), get("JAX_PROCESS_ID", "ELM_PROCESS_ID")
  ids = get("JAX_LOCAL_DEVICE_IDS", "ELM_LOCAL_DEVICE_IDS")
  return DistributedConfig(
      coordinator_address=get("JAX_COORDINATOR_ADDRESS", "ELM_COORDINATOR_ADDRESS"),
      num_processes=int(n) if n else None, process_id=int(i) if i else None,
      local_device_ids=tuple(int(x) for x in ids.split(",")) if ids else None,
      cluster_detection=get("ELM_CLUSTER_DETECTION"),
      cpu_collectives=get("ELM_CPU_COLLECTIVES") or "gloo")


def _cluster_detected() -> bool:
  """True when jax's cluster auto-detection applies and describes more than one process:
  SLURM with several tasks, Open MPI with several ranks, a (multi-host) TPU slice, GKE."""
  name = _compat.detected_cluster()
  if name is None:
    return False
  if name == "SlurmCluster":
    return (_env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS") or 1) > 1
  if name in ("OmpiCluster", "Mpi4pyCluster"):
    return (_env_int("OMPI_COMM_WORLD_SIZE") or 2) > 1
  return True


def maybe_initialize_distributed(cfg: DistributedConfig | None = None, *,
                                 force: bool = False) -> bool:
  """`jax.distributed.initialize(...)` when this is one process of a multi-process job.

  Triggers, in order: an explicit coordinator address (flags or JAX_COORDINATOR_ADDRESS, with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID), or a cluster jax detects itself (SLURM with more than
  one task, Open MPI, a multi-host TPU slice), or `force` / ELM_DISTRIBUTED=1. Must run before
  anything touches a jax backend. Returns whether jax.distributed is (now) initialised; a single
  process (no trigger) is left alone.
  """
  if _compat.distributed_is_initialized():
    return True
  cfg = distributed_from_env() if cfg is None else cfg
  force = force or os.environ.get("ELM_DISTRIBUTED") == "1"
  explicit = cfg.coordinator_address is not None
  if not (explicit or force or _cluster_detected()):
    return False
  if cfg.num_processes == 1 and not force:
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.values.get("jax_platforms")
                                                         or "")
  if platforms.split(",")[0].strip() == "cpu":
    _compat.set_cpu_collectives(cfg.cpu_collectives)
  _compat.distributed_initialize(
      coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
      process_id=cfg.process_id,
      local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None,
      cluster_detection_method=cfg.cluster_detection,
      initialization_timeout=cfg.initialization_timeout)
  return True
