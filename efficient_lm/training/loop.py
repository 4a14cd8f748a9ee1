"""The training loop: build model + optimizer on a mesh, jit the pure step with explicit
shardings and donation, feed Grain batches, log, evaluate, checkpoint, resume.

`train(cfg, workdir)` is idempotent on a workdir: it resumes from the newest readable checkpoint
(and the data iterator state saved with it), rewrites `metrics.jsonl` to the restored step, and
continues; so a killed run rerun with the same command produces the same losses as one that
never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_lm import sharding as shd
from efficient_lm.data.pipeline import Data
from efficient_lm.data.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer, save_tokenizer
from efficient_lm.training.checkpoint import Checkpointer
from efficient_lm.training.config import ConfigError, RunConfig
from efficient_lm.training.metrics import JsonlWriter, Progress, TensorBoardWriter
from efficient_lm.training.optim import make_optimizer, weight_decay_mask
from efficient_lm.training.step import StepOptions, make_eval_step, make_train_step

log = logging.getLogger("efficient_lm")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient; the workdir keeps the last good checkpoint."""


# ------------------------------------------------------------------ model + state on a mesh


def resolve_compute_dtype(name: str) -> str:
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if name not in ("float32", "bfloat16"):
    raise ConfigError(f"train.compute_dtype must be auto, float32 or bfloat16, got {name!r}")
  return name


def resolve_model_config(cfg: RunConfig, vocab_size: int):
  """The preset + overrides, with the data's vocabulary and the run's compute dtype filled in.
  Master weights stay float32 (param_dtype) unless explicitly overridden."""
  extra: dict[str, Any] = {}
  over = cfg.model_overrides
  if "vocab_size" in over:
    if over["vocab_size"] < vocab_size:
      raise ConfigError(f"model.vocab_size={over['vocab_size']} is smaller than the data's "
                       f"vocabulary ({vocab_size})")
  else:
    extra["vocab_size"] = vocab_size
  if "dtype" not in over:
    extra["dtype"] = resolve_compute_dtype(cfg.train.compute_dtype)
  if "param_dtype" not in over:
    extra["param_dtype"] = "float32"
  return cfg.model_config(**extra)


@dataclasses.dataclass
class Setup:
  """Everything compiled for one run; `state` is {"params", "opt_state", "step"}."""
  mesh: Any
  model_cfg: Any
  graphdef: Any
  rest: Any
  state_shardings: Any
  batch_sharding: Any
  init: Callable
  train_step: Callable
  eval_step: Callable
  schedule: Callable


def build(cfg: RunConfig, model_cfg, mesh) -> Setup:
  from efficient_lm import create_model

  seed = cfg.train.seed

  def make():
    model = create_model(model_cfg, seed=seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest

  abstract_model = nnx.eval_shape(lambda: create_model(model_cfg, seed=seed))
  graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
  p_shard = shd.param_shardings(abs_params, mesh)
  abs_pure = nnx.to_pure_dict(abs_params)
  rest_pure = nnx.to_pure_dict(abs_rest)
  repl = shd.replicated(mesh)
  rest_shard = jax.tree.map(lambda _: repl, rest_pure)

  optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps,
                                       mask=weight_decay_mask(abs_pure))
  abs_opt = jax.eval_shape(optimizer.init, abs_pure)
  opt_shard = optax.tree_map_params(
      optimizer, lambda _, s: s, abs_opt, p_shard,
      transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  state_sh = {"params": p_shard, "opt_state": opt_shard, "step": repl}

  def init_fn():
    _, params, rest = make()
    params = nnx.to_pure_dict(params)
    return ({"params": params, "opt_state": optimizer.init(params),
             "step": jnp.zeros((), jnp.int32)}, nnx.to_pure_dict(rest))

  batch_sh = shd.batch_sharding(mesh)
  moe = getattr(model_cfg, "n_experts", 0) > 0
  opts = StepOptions(grad_accum=cfg.train.grad_accum, z_loss=cfg.train.z_loss, moe=moe,
                     dropout=model_cfg.uses_dropout, dropout_seed=seed)
  step_fn = make_train_step(graphdef, optimizer, schedule, opts)
  eval_fn = make_eval_step(graphdef, moe=moe)
  batch_tree = {k: batch_sh for k in ("inputs", "targets", "segment_ids", "loss_mask")}
  init = jax.jit(init_fn, out_shardings=(state_sh, rest_shard))
  train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_tree, rest_shard),
                       out_shardings=(state_sh, repl), donate_argnums=(0,))
  eval_step = jax.jit(eval_fn, in_shardings=(p_shard, batch_tree, rest_shard),
                      out_shardings=repl)
  return Setup(mesh=mesh, model_cfg=model_cfg, graphdef=graphdef, rest=None,
               state_shardings=state_sh, batch_sharding=batch_sh, init=init,
               train_step=train_step, eval_step=eval_step, schedule=schedule)


def abstract_state(setup: Setup, state) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, setup.state_shardings)


# ------------------------------------------------------------------ evaluation


def unit_name(tokenizer) -> str:
  if tokenizer is None:
    return "token"
  if isinstance(tokenizer, ByteTokenizer):
    return "byte"
  if isinstance(tokenizer, CharTokenizer):
    return "char"
  return "token"


def evaluate(setup: Setup, params, rest, batches: list[dict], unit: str = "token") -> dict:
  ce = correct = tokens = 0.0
  for b in batches:
    out = jax.device_get(setup.eval_step(params, shd.global_batch(b, setup.batch_sharding), rest))
    ce += float(out["ce"])
    correct += float(out["correct"])
    tokens += float(out["tokens"])
  tokens = max(tokens, 1.0)
  loss = ce / tokens
  return {"eval_loss": loss,
          "eval_perplexity": math.exp(min(loss, 700.0)),
          f"eval_bits_per_{unit}": loss / math.log(2.0),
          "eval_accuracy": correct / tokens}


# ------------------------------------------------------------------ the loop


class _StopSignals:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and returns."""

  def __init__(self):
    self.signum: int | None = None
    self._old = {}

  def __enter__(self):
    import threading
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signum = signum
    log.warning("received %s: saving a checkpoint and stopping after this step",
                signal.Signals(signum).name)

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


def setup_logging(level=logging.INFO) -> None:
  if not log.handlers:
    h = logging.StreamHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(h)
    log.propagate = False
  log.setLevel(level)


def load_data(cfg: RunConfig, workdir: str) -> Data:
  """The run's data; a character vocabulary saved in the workdir is reused on resume."""
  tok_path = os.path.join(workdir, "tokenizer.json")
  tokenizer = None
  if cfg.data.source != "mqar" and cfg.data.tokenizer == "chars" and os.path.exists(tok_path):
    tokenizer = load_tokenizer(tok_path)
  return Data(cfg.data, tokenizer=tokenizer)


def train(cfg: RunConfig, workdir: str, *, devices=None,
          stop_after: int | None = None) -> dict:
  """Train (or resume) `cfg` in `workdir`; -> summary dict of the last step and evaluation.

  `stop_after`: return after this many steps of this call (tests use it to simulate a crash).
  """
  # Multi-process: every process computes, restores and saves; only process 0 writes
  # config/tokenizer files, metrics.jsonl, TensorBoard, the progress line and INFO logs.
  setup_logging(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  tc = cfg.train
  if tc.batch_size % max(tc.grad_accum, 1):
    raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by "
                     f"train.grad_accum={tc.grad_accum}")
  pidx, pcount = jax.process_index(), jax.process_count()
  lead = pidx == 0
  mesh = shd.make_mesh(cfg.mesh, devices)
  data = load_data(cfg, workdir)
  model_cfg = resolve_model_config(cfg, data.vocab_size)
  if lead:
    if data.tokenizer is not None:
      save_tokenizer(data.tokenizer, os.path.join(workdir, "tokenizer.json"))
    _write_json_atomic(os.path.join(workdir, "config.json"), cfg.to_dict())
    _write_json_atomic(os.path.join(workdir, "model_config.json"),
                       dataclasses.asdict(model_cfg))
  setup = build(cfg, model_cfg, mesh)
  state, rest = setup.init()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  log.info("model %s: %.2fM parameters; mesh %s; %d process(es)", cfg.model, n_params / 1e6,
           dict(mesh.shape), pcount)

  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, keep_best=tc.keep_best,
                      async_save=tc.async_checkpoint)
  it = data.train_iterator(tc.batch_size, pidx, pcount)
  start, restored = ckpt.restore_latest(abstract_state(setup, state), it)
  if restored is not None:
    state = restored["state"]
    log.info("resumed from checkpoint at step %d in %s", start, ckpt.directory)
  else:
    start = 0
    it = data.train_iterator(tc.batch_size, pidx, pcount)  # a failed restore may have moved it
  eval_batches = data.eval_batches(tc.batch_size, tc.eval_batches, pidx, pcount)
  unit = unit_name(data.tokenizer)

  metrics_file = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  tb = None
  if lead:
    metrics_file.truncate_after(start)
    if tc.tensorboard:
      tb = TensorBoardWriter(os.path.join(workdir, "tb"))
  progress = Progress(tc.steps, start, enabled={"on": True, "off": False}.get(tc.progress)
                      if lead else False)
  tokens_per_step = tc.batch_size * cfg.data.seq_len
  cfg_dict = cfg.to_dict()
  summary: dict[str, Any] = {"step": start, "workdir": workdir}
  last_saved = start if restored is not None else None
  step = start
  pending = None  # (step, device metrics) not yet checked for finiteness

  def check(p):
    if p is None:
      return None
    s, m = p
    host = jax.device_get(m)
    if not bool(host["finite"]):
      good = ckpt.latest_step()
      raise NonFiniteLossError(
          f"non-finite training loss at step {s} (loss={float(host['loss'])}, "
          f"grad_norm={float(host['grad_norm'])}); stopping. "
          + (f"The last good checkpoint is step {good} in {ckpt.directory}; rerunning resumes "
             f"from it. " if good is not None else "No checkpoint was written yet. ")
          + "Try a lower optim.lr, a longer optim.warmup_steps or train.compute_dtype=float32.")
    return host

  def save(s, extra=None):
    nonlocal last_saved
    ckpt.save(s, state, it, cfg_dict, metrics=extra)
    last_saved = s

  t_mark, step_mark = None, step
  # Step s+1 is dispatched before step s's loss is checked (one step of lag keeps the device
  # busy); a non-finite step leaves the state unchanged, so nothing bad is ever saved.
  try:
    with _StopSignals() as stop:
      while step < tc.steps:
        if stop.signum is not None:
          break
        if stop_after is not None and step - start >= stop_after:
          break
        batch = shd.global_batch(next(it), setup.batch_sharding)
        state, m = setup.train_step(state, batch, rest)
        step += 1
        check(pending)
        pending = (step, m)
        if t_mark is None:  # time from the end of the first (compiling) step
          jax.block_until_ready(m)
          t_mark, step_mark = time.time(), step
        do_eval = (tc.eval_every > 0 and step % tc.eval_every == 0) or step == tc.steps
        do_log = step % max(tc.log_every, 1) == 0 or do_eval or step == tc.steps
        do_ckpt = (tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0) or step == tc.steps
        record = None
        if do_log:
          host = check(pending)
          pending = None
          now = time.time()
          tok_s = (tokens_per_step * (step - step_mark) / (now - t_mark)
                   if step > step_mark else float("nan"))
          t_mark, step_mark = now, step
          record = {"step": step, "loss": float(host["loss"]), "lr": float(host["lr"]),
                    "grad_norm": float(host["grad_norm"]), "accuracy": float(host["accuracy"]),
                    "tokens_per_sec": tok_s}
          if float(host["aux_loss"]) != 0.0:
            record["aux_loss"] = float(host["aux_loss"])
          progress.update(step, record["loss"], tok_s)
        eval_metrics = None
        if do_eval:
          eval_metrics = evaluate(setup, state["params"], rest, eval_batches, unit)
          record.update(eval_metrics)
          t_mark = time.time()  # evaluation time is not training throughput
        if record is not None:
          summary.update(record)
          if lead:
            metrics_file.write(record)
            if tb is not None:
              tb.scalars(step, {k: v for k, v in record.items() if k != "step"})
            if do_eval:
              if progress.enabled:
                progress.stream.write("\n")
              log.info("step %d: " + " ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()),
                       step)
        if do_ckpt:
          check(pending)
          pending = None
          save(step, {"eval_loss": eval_metrics["eval_loss"]} if eval_metrics else None)
      check(pending)
      pending = None
      if stop.signum is not None:
        if last_saved != step:
          save(step)
        summary["interrupted"] = signal.Signals(stop.signum).name
        log.warning("stopped by %s at step %d; checkpoint saved; rerun the same command to "
                    "resume", summary["interrupted"], step)
  finally:
    progress.close()
    ckpt.close()  # finishes any in-flight async save, so the workdir is never left half-written
    metrics_file.close()
    if tb is not None:
      tb.close()
  summary["step"] = step
  return summary


# ------------------------------------------------------------------ loading a trained run


def load_run(workdir: str, step: int | None = None, devices=None):
  """-> (cfg, setup, params, rest, tokenizer) of a run's checkpoint (latest by default)."""
  from efficient_lm.training.config import from_file

  workdir = os.path.abspath(workdir)
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{workdir} has no config.json: not an elm training workdir")
  cfg = from_file(cfg_path)
  mesh = shd.make_mesh(cfg.mesh if devices is None else shd.MeshConfig(1, -1, 1), devices)
  tok_path = os.path.join(workdir, "tokenizer.json")
  tokenizer = load_tokenizer(tok_path) if os.path.exists(tok_path) else None
  with open(os.path.join(workdir, "model_config.json")) as f:
    mc = json.load(f)
  from efficient_lm.configs import ModelConfig
  model_cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in mc.items()})
  setup = build(cfg, model_cfg, mesh)
  state, rest = setup.init()
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, keep_best=cfg.train.keep_best,
                      async_save=False)
  try:
    if step is None:
      got, restored = ckpt.restore_latest(abstract_state(setup, state))
    else:
      got, restored = step, ckpt.restore(step, abstract_state(setup, state))
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir} has no readable checkpoint")
  return cfg, setup, restored["state"]["params"], rest, tokenizer, got
