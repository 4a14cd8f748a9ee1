"""The pure train and eval steps: (state, batch) -> (state, metrics). No jit, no mesh here.

A batch is a dict of [B, T] arrays: inputs, targets, segment_ids (int32), loss_mask (float32).
The loss is the mean token cross-entropy over loss_mask, plus `z_loss * mean(logsumexp^2)`, plus
the model's MoE auxiliary loss. By default the head and the loss run chunked over tokens
(`efficient_lm.kernels.chunked_token_stats`, `StepOptions.loss_chunk_size` tokens at a time),
so the float32 [tokens, vocab] logits never exist at once; `loss_chunk_size=0` takes the plain
path through `model(...)` logits. With `grad_accum = k` the batch is split into k micro-batches
(rows i*k + j form micro-batch j) whose gradients are summed with the same normalisation, so
the update equals the one of the whole batch. With `StepOptions.dropout` the train step passes
the model a key derived from (dropout_seed, step, micro-batch); the eval step never does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from efficient_lm.kernels import chunked_token_stats


@dataclasses.dataclass(frozen=True)
class StepOptions:
  grad_accum: int = 1
  z_loss: float = 0.0
  moe: bool = False            # call the model with return_aux=True and add "moe_aux_loss"
  aux_loss_scale: float = 1.0  # multiplies the model's moe_aux_loss
  loss_chunk_size: int = 1024  # tokens per chunk of the head + loss; 0: plain full logits
  dropout: bool = False        # pass a per-step PRNG key to the model (its config.dropout > 0)
  dropout_seed: int = 0        # the key is fold_in(key(dropout_seed), step [, micro-batch])


def token_stats(logits_BTV, targets_BT, mask_BT):
  """-> (sum of cross-entropy, sum of logsumexp^2, number correct) over masked tokens (float32)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  tgt_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  ce = jnp.sum((lse_BT - tgt_BT) * mask_BT)
  z = jnp.sum(jnp.square(lse_BT) * mask_BT)
  correct = jnp.sum((jnp.argmax(logits_BTV, -1) == targets_BT) * mask_BT)
  return ce, z, correct


def model_token_stats(graphdef, params, rest, batch, moe: bool, chunk_size: int, dropout_key=None):
  """-> ((sum CE, sum logsumexp^2, number correct), moe aux loss); chunked when the model has
  `hidden`/`head_weight` and chunk_size > 0, else through the full logits. `dropout_key`
  (training only) turns on the model's dropout."""
  model = nnx.merge(graphdef, params, rest) if rest else nnx.merge(graphdef, params)
  if chunk_size <= 0 or not hasattr(model, "hidden"):
    logits, aux = apply_model(graphdef, params, rest, batch, moe, dropout_key)
    return token_stats(logits, batch["targets"], batch["loss_mask"]), aux
  kw = {} if dropout_key is None else {"dropout_key": dropout_key}
  h_BTD, aux = model.hidden(batch["inputs"], batch["segment_ids"], return_aux=True, **kw)
  w, layout = model.head_weight()
  stats = chunked_token_stats(h_BTD.reshape(-1, h_BTD.shape[-1]), w, batch["targets"].reshape(-1),
                              batch["loss_mask"].reshape(-1), w_layout=layout, chunk_size=chunk_size)
  return stats, (aux["moe_aux_loss"] if moe else jnp.zeros((), jnp.float32))


def apply_model(graphdef, params, rest, batch, moe: bool, dropout_key=None):
  model = nnx.merge(graphdef, params, rest) if rest else nnx.merge(graphdef, params)
  kw = {} if dropout_key is None else {"dropout_key": dropout_key}
  if moe:
    logits, aux = model(batch["inputs"], batch["segment_ids"], return_aux=True, **kw)
    return logits, aux["moe_aux_loss"]
  return model(batch["inputs"], batch["segment_ids"], **kw), jnp.zeros((), jnp.float32)


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    schedule: Callable, opts: StepOptions = StepOptions()):
  """-> train_step(state, batch, rest) with state = {"params", "opt_state", "step"}."""
  k = int(opts.grad_accum)

  def micro_loss(params, rest, micro, n_tok, key=None):
    (ce, z, correct), aux = model_token_stats(graphdef, params, rest, micro, opts.moe,
                                              opts.loss_chunk_size, key)
    aux = opts.aux_loss_scale * aux.astype(jnp.float32)
    loss = (ce + opts.z_loss * z) / n_tok + aux / k
    return loss, (ce, aux, correct)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state, batch, rest=None):
    params = state["params"]
    n_tok = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    # Dropout: a key per step (and micro-batch) from the step counter, so a resumed run
    # draws the same masks as one that never stopped.
    key = (jax.random.fold_in(jax.random.key(opts.dropout_seed), state["step"])
           if opts.dropout else None)
    if k == 1:
      (loss, (ce, aux, correct)), grads = grad_fn(params, rest, batch, n_tok, key)
    else:
      B = batch["inputs"].shape[0]
      if B % k:
        raise ValueError(f"batch size {B} is not divisible by grad_accum={k}")
      micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((B // k, k) + x.shape[1:]), 0, 1),
                           batch)

      def body(carry, xs):
        mb, j = xs
        g_acc, l_acc, ce_acc, aux_acc, c_acc = carry
        (l, (ce, aux, c)), g = grad_fn(params, rest, mb, n_tok,
                                       None if key is None else jax.random.fold_in(key, j))
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, l_acc + l, ce_acc + ce, aux_acc + aux / k, c_acc + c), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      z0 = jnp.zeros((), jnp.float32)
      (grads, loss, ce, aux, correct), _ = jax.lax.scan(body, (zeros, z0, z0, z0, z0),
                                                        (micro, jnp.arange(k)))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    # A non-finite step changes nothing: the state stays the last good one.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {
        "loss": ce / n_tok,
        "total_loss": loss,
        "aux_loss": aux,
        "accuracy": correct / n_tok,
        "grad_norm": grad_norm,
        "lr": schedule(state["step"]),
        "tokens": n_tok,
        "finite": finite,
    }
    return new, metrics

  return train_step


def make_eval_step(graphdef, moe: bool = False, loss_chunk_size: int = 1024):
  """-> eval_step(params, batch, rest) -> sums {"ce", "correct", "tokens"} over the batch."""

  def eval_step(params, batch, rest=None):
    (ce, _, correct), _ = model_token_stats(graphdef, params, rest, batch, moe, loss_chunk_size)
    return {"ce": ce, "correct": correct, "tokens": jnp.sum(batch["loss_mask"])}

  return eval_step
