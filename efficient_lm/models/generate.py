"""Sampling: prefill the prompt, then `decode` one token at a time inside one jitted scan."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits_BV, key, temperature: float, top_k: int | None, top_p: float | None):
  """temperature 0 is greedy; top_k keeps the k largest; top_p keeps the smallest set of
  tokens whose probability reaches p (the most likely token always stays)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1)
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    keep = cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p      # mass before this token < p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(graphdef, state, prompt_BT, key, *, max_new_tokens, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  logits, cache = model.prefill(prompt_BT, prompt_BT.shape[1] + max_new_tokens)
  key, sub = jax.random.split(key)
  first = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)

  def body(carry, _):
    token, cache, key = carry
    logits, cache = model.decode(token[:, None], cache)
    key, sub = jax.random.split(key)
    nxt = sample_logits(logits[:, 0], sub, temperature, top_k, top_p)
    return (nxt, cache, key), token

  _, tokens = jax.lax.scan(body, (first, cache, key), None, length=max_new_tokens)
  return jnp.moveaxis(tokens, 0, 1)


def generate(model, prompt_BT, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0):
  """Returns `[B, T + max_new_tokens]`: the prompt followed by the sampled tokens."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
  prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
  graphdef, state = nnx.split(model)
  new = _generate(graphdef, state, prompt_BT, jax.random.key(seed), max_new_tokens=max_new_tokens,
                  temperature=float(temperature), top_k=top_k, top_p=top_p)
  return jnp.concatenate([prompt_BT, new], axis=1)
