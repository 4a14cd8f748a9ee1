"""Orbax checkpoints of a run: train state (params, optimizer state, step), the Grain iterator
state, and the resolved config, under `workdir/checkpoints/<step>/`.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a killed
save leaves no half checkpoint behind; `restore_latest` walks back from the newest step and skips
(with a warning) any checkpoint it cannot read, so a corrupt newest checkpoint falls back to the
one before it. Every process of a multi-process job calls save/restore (Orbax writes each array
shard from the process that holds it and lets process 0 finalise); a checkpoint restores on any
number of processes and any mesh. Kept: the last `keep` checkpoints plus the `keep_best` with the lowest eval loss.
"""
from __future__ import annotations

import json
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
    foreign = None
    if data_iter is not None:
      foreign = self._foreign_data_state(step)
      if foreign is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    if foreign is not None:
      data_iter.set_state(foreign)
      if hasattr(data_iter, "start_prefetch"):
        data_iter.start_prefetch()
      out = {**{k: out[k] for k in out.keys()}, "data": data_iter}
    return out

  def _foreign_data_state(self, step: int) -> dict | None:
    """The iterator state of a checkpoint written by a different number of processes, else None.

    Grain stores one `process_<i>-of-<n>.json` per process. Our pipeline's state is the global
    batch index (`{"next_index": b}`; process p's batch b is rows of global batch b), the same in
    every file, so any file of another topology positions this process's shard correctly."""
    data_dir = os.path.join(self.directory, str(int(step)), "data")
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isdir(data_dir) or os.path.exists(os.path.join(data_dir, mine)):
      return None
    files = sorted(f for f in os.listdir(data_dir) if f.startswith("process_")
                   and f.endswith(".json"))
    if not files:
      return None
    with open(os.path.join(data_dir, files[0]), encoding="utf-8") as f:
      state = json.load(f)
    log.info("checkpoint %d was written by %s; resuming this process's data shard from its "
             "global batch index %s", step, files[0].split("-of-")[-1][:-5] + " process(es)",
             state.get("next_index"))
    return state

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
