"""Orbax checkpoints of a run: train state (params, optimizer state, step), the Grain iterator
state, and the resolved config, under `workdir/checkpoints/<step>/`.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a killed
save leaves no half checkpoint behind; `restore_latest` walks back from the newest step and skips
(with a warning) any checkpoint it cannot read, so a corrupt newest checkpoint falls back to the
one before it. Kept: the last `keep` checkpoints plus the `keep_best` with the lowest eval loss.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger("efficient_lm")


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, keep_best: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    policies = [ocm.LatestN(n=max(int(keep), 1))]
    if keep_best > 0:
      policies.append(ocm.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True,
                                n=int(keep_best), keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None,
           config: dict, metrics: dict | None = None, force: bool = True) -> bool:
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(int(step), args=ocp.args.Composite(**items),
                             metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any,
              data_iter: grain.DatasetIterator | None = None) -> dict:
    items = {"state": ocp.args.StandardRestore(abstract_state),
             "config": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(int(step), args=ocp.args.Composite(**items))

  def restore_latest(self, abstract_state: Any,
                     data_iter: grain.DatasetIterator | None = None):
    """-> (step, restored) of the newest readable checkpoint, or (None, None) if there is none."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.restore(step, abstract_state, data_iter)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
        log.warning("checkpoint at step %d in %s is unreadable (%s: %s); falling back to the "
                    "previous checkpoint", step, self.directory, type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else "")
    return None, None

  def read_config(self, step: int | None = None) -> dict | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self.manager.restore(int(step), args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """Concrete arrays -> ShapeDtypeStructs with the same shardings (an Orbax restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
