"""Logit distillation: fine-tune a converted model toward its teacher's next-token distribution
instead of the data's next token (after `convert_to_dijiang`, `calibrate_dijiang`, optionally
`transfer_attention`). In the CPU study of experiments/results/dijiang/cpu_study it gained
0.025-0.035 nats over cross-entropy fine-tuning in the same 50 steps.

    add = with_teacher_logits(teacher)                       # add(batch): plus batch["teacher_logits"]
    step = make_distill_step(graphdef, optimizer, schedule)  # in place of make_train_step's

The teacher's logits travel in the batch, so the step keeps `make_train_step`'s signature
(state, batch, rest) and a loop written for that one runs it unchanged. They are [B, T, V]
float32 a batch: meant for small vocabularies (a large one would run the teacher inside the step).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from efficient_lm.models import LM
from efficient_lm.training.step import apply_model, token_stats


def kl_to_teacher(student_logits_BTV, teacher_logits_BTV, mask_BT):
  """Sum over the tokens of `mask_BT` (weights) of KL(teacher || student) between the two
  next-token distributions, temperature 1, in float32 whatever the logits' dtype."""
  logp_s = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32), -1)
  logp_t = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32), -1)
  kl_BT = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), -1)
  return jnp.sum(kl_BT * mask_BT)


def with_teacher_logits(teacher: LM) -> Callable[[dict], dict]:
  """-> add(batch): the batch plus "teacher_logits", the teacher's float32 logits on its inputs
  (computed in its compute dtype with the head's float32 accumulation; no dropout: its
  distribution is the target). One compiled teacher forward for every batch."""
  graphdef, state = nnx.split(teacher)

  @jax.jit
  def logits(state, inputs_BT, segment_ids_BT):
    return nnx.merge(graphdef, state)(inputs_BT, segment_ids_BT).astype(jnp.float32)

  def add(batch: dict) -> dict:
    inputs = jnp.asarray(batch["inputs"], jnp.int32)
    return {**batch, "teacher_logits": logits(state, inputs, batch.get("segment_ids"))}

  return add


def make_distill_step(graphdef, optimizer: optax.GradientTransformation, schedule: Callable, *,
                      dropout: bool = False, dropout_seed: int = 0):
  """-> train_step(state, batch, rest) as `efficient_lm.training.step.make_train_step`'s (state
  {"params", "opt_state", "step"}, the same metrics, a non-finite step skipped, dropout keys
  fold_in(key(dropout_seed), step)), minimising the mean over loss_mask tokens of
  `kl_to_teacher` against batch["teacher_logits"] (`with_teacher_logits`). Metrics "loss" and
  "accuracy" stay the model's cross-entropy and accuracy on the targets, comparable with a
  cross-entropy run's; "total_loss" is the KL. Dense models, no gradient accumulation (the
  MoE auxiliary loss is not added)."""

  def loss_fn(params, rest, batch, n_tok, key):
    logits, _ = apply_model(graphdef, params, rest, batch, False, key)
    kl = kl_to_teacher(logits, batch["teacher_logits"], batch["loss_mask"]) / n_tok
    ce, _, correct = token_stats(logits, batch["targets"], batch["loss_mask"])
    return kl, (ce, correct)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch, rest=None):
    params = state["params"]
    n_tok = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    key = jax.random.fold_in(jax.random.key(dropout_seed), state["step"]) if dropout else None
    (kl, (ce, correct)), grads = grad_fn(params, rest, batch, n_tok, key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    finite = jnp.isfinite(kl) & jnp.isfinite(grad_norm)
    new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {"loss": ce / n_tok, "total_loss": kl, "aux_loss": jnp.zeros((), jnp.float32),
               "accuracy": correct / n_tok, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "tokens": n_tok, "finite": finite}
    return new, metrics

  return train_step
