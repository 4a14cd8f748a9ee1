"""Small character-level LM training for the analysis experiments (dijiang_conversion, moe_routing).

Character Tiny Shakespeare (experiments.md 2): the 65-character vocabulary of the whole text,
first 90% train, last 10% validation. Training batches are random windows (nanoGPT's sampler,
seeded numpy); validation is every non-overlapping window of the validation split.

Needs only jax, flax, optax and numpy (no grain: the GPU machines lack it). The train step is
the library's (`efficient_lm.training.step.make_train_step`, chunked head + loss, MoE aux loss)
and the optimizer the library's AdamW + warmup + cosine (`make_optimizer`), built with peak
lr 1 and followed by `optax.scale(lr)` whose lr lives in the optimizer state: one compiled step
serves every learning rate and seed of a model shape.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from efficient_lm.training.optim import OptimConfig  # noqa: E402
from efficient_lm.training.step import StepOptions, make_eval_step, make_train_step  # noqa: E402
from experiments import lmrun  # noqa: E402
from experiments.lmrun import make_opt, set_lr  # noqa: E402

@dataclasses.dataclass
class CharData:
  train: np.ndarray      # int32 token ids
  val: np.ndarray
  vocab_size: int
  path: str

  def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int) -> dict:
    """Random windows of the train split (nanoGPT's get_batch)."""
    starts = rng.integers(0, self.train.size - seq_len - 1, batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None]
    win = self.train[idx]
    return make_batch(win)

  def val_batches(self, batch_size: int, seq_len: int, max_windows: int = 0) -> list[dict]:
    """Every non-overlapping window of the validation split (or the first `max_windows`),
    in batches of `batch_size` (the last one padded with zero-mask rows)."""
    n = (self.val.size - 1) // seq_len
    if max_windows:
      n = min(n, max_windows)
    wins = np.stack([self.val[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
    out = []
    for i in range(0, n, batch_size):
      w = wins[i: i + batch_size]
      mask = np.ones((batch_size, seq_len), np.float32)
      if w.shape[0] < batch_size:
        mask[w.shape[0]:] = 0.0
        w = np.concatenate([w, np.zeros((batch_size - w.shape[0], seq_len + 1), w.dtype)])
      out.append(make_batch(w, mask))
    return out


def make_batch(windows_BT1: np.ndarray, mask=None) -> dict:
  b, t1 = windows_BT1.shape
  return {"inputs": jnp.asarray(windows_BT1[:, :-1], jnp.int32),
          "targets": jnp.asarray(windows_BT1[:, 1:], jnp.int32),
          "segment_ids": None,
          "loss_mask": jnp.asarray(np.ones((b, t1 - 1), np.float32) if mask is None else mask)}


def load_chars(limit_chars: int = 0) -> CharData:
  """`lmrun.load_chars` (the one Tiny Shakespeare split) with this module's batching."""
  d = lmrun.load_chars(limit_chars)
  return CharData(train=d.train, val=d.val, vocab_size=d.vocab_size, path=d.path)


class Trainer:
  """One compiled train step and eval step for a model shape (graphdef); `fit` trains any
  model of that shape (other seeds, a converted model) at any learning rate."""

  def __init__(self, model, ocfg: OptimConfig, steps: int, *, moe: bool = False):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    self.graphdef = graphdef
    self.steps = steps
    self.moe = moe
    params_pure = nnx.to_pure_dict(params)
    self.opt, self.schedule = make_opt(ocfg, steps, params_pure)
    dropout = getattr(getattr(model, "config", None), "dropout", 0.0) > 0
    step = make_train_step(graphdef, self.opt, self.schedule, StepOptions(moe=moe, dropout=dropout))
    self._step = jax.jit(step, donate_argnums=(0,))
    self._eval = jax.jit(make_eval_step(graphdef, moe=moe))

  def split(self, model):
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def merge(self, params, rest):
    return nnx.merge(self.graphdef, params, rest)

  def evaluate(self, params, rest, batches) -> float:
    ce = tok = 0.0
    for b in batches:
      out = jax.device_get(self._eval(params, b, rest))
      ce += float(out["ce"])
      tok += float(out["tokens"])
    return ce / max(tok, 1.0)

  def fit(self, model, data: CharData, *, lr: float, batch_size: int, seq_len: int, seed: int,
          val_batches, eval_every: int = 0, log_every: int = 50, log=print, steps: int | None = None):
    """Trains a copy of `model`'s parameters -> (params, rest, record). record: final and
    curve of validation losses, train loss curve, median step time (s, compile excluded)."""
    steps = steps or self.steps
    params, rest = self.split(model)
    params = jax.tree.map(jnp.array, params)     # the donated state never aliases the model
    state = {"params": params, "opt_state": set_lr(self.opt.init(params), lr),
             "step": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(seed)
    curve, train_curve, times = [], [], []
    t0 = time.time()
    window_start, window_steps = None, 0
    for s in range(1, steps + 1):
      state, m = self._step(state, data.batch(rng, batch_size, seq_len), rest)
      window_steps += 1
      if s == 1:
        jax.block_until_ready(m)
        compile_s = time.time() - t0
        window_start, window_steps = time.time(), 0
      do_eval = eval_every and (s % eval_every == 0) and s != steps
      if s % log_every == 0 or s == steps or do_eval:
        host = jax.device_get(m)
        now = time.time()
        if window_steps:
          times.append((now - window_start) / window_steps)
        if not bool(host["finite"]):
          log(f"  step {s}: non-finite loss; the state keeps the last finite step")
        train_curve.append([s, float(host["loss"])])
        if do_eval:
          v = self.evaluate(state["params"], rest, val_batches)
          curve.append([s, v])
          log(f"  step {s}: train {float(host['loss']):.4f} val {v:.4f}")
        window_start, window_steps = time.time(), 0
    final = self.evaluate(state["params"], rest, val_batches)
    curve.append([steps, final])
    record = {"val_loss": final, "val_curve": curve, "train_curve": train_curve, "lr": lr, "seed": seed,
              "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
              "tokens": steps * batch_size * seq_len,
              "step_time_s": statistics.median(times) if times else None,
              "compile_s": round(compile_s, 2), "wall_s": round(time.time() - t0, 2)}
    log(f"  done: val {final:.4f}, {record['step_time_s'] or float('nan'):.4f} s/step, {record['wall_s']} s")
    return state["params"], rest, record


def param_count(model) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def fmt(x, nd=3):
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  return f"{x:.{nd}f}"
