"""AdamW with a weight-decay mask, linear warmup + cosine decay to a floor, global-norm clipping."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-3                # peak learning rate
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1       # the cosine ends at lr * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0          # global-norm clipping; 0 disables


def lr_schedule(cfg: OptimConfig, total_steps: int) -> Callable[[Any], jax.Array]:
  """lr(step) for the update at `step` (0-based): warmup (step+1)/W * lr for step < W, then
  cosine from lr (at step W) to lr * min_lr_ratio (at step total_steps - 1 and after)."""
  peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
  warm = max(int(cfg.warmup_steps), 0)
  decay = max(int(total_steps) - 1 - warm, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm_lr = peak * (step + 1.0) / max(warm, 1)
    frac = jnp.clip((step - warm) / decay, 0.0, 1.0)
    cos_lr = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warm, warm_lr, cos_lr)

  return schedule


def default_weight_decay_mask(params) -> Any:
  """Decay matrices (ndim >= 2), not vectors (norm scales, biases, gates)."""
  return jax.tree.map(lambda p: len(getattr(p, "shape", ())) >= 2, params)


def weight_decay_mask(params) -> Any:
  """The model zoo's mask (`efficient_lm.models.weight_decay_mask`) when it exists, else ours."""
  try:
    from efficient_lm.models import weight_decay_mask as model_mask  # type: ignore
  except ImportError:
    return default_weight_decay_mask(params)
  return model_mask(params)


def make_optimizer(cfg: OptimConfig, total_steps: int, mask: Any = None):
  """-> (optax transformation, schedule). `mask`: a pytree of bools or a callable on params."""
  schedule = lr_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=mask if mask is not None else weight_decay_mask))
  return optax.chain(*parts), schedule
