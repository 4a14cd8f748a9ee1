"""Dropless top-k mixture of SwiGLU experts.

Every (token, choice) pair is computed: pairs are sorted by expert and the expert matmuls are
ragged dots over the expert groups (gate and up fused into one), so no capacity and no dropped
tokens. The ragged dot is `efficient_lm.kernels.ragged_dot`: tokamax's Mosaic kernel on Hopper
GPUs and TPUs (on GPUs with our own weight gradient), `jax.lax.ragged_dot` elsewhere; the
token rows are gathered by `kernels.gather_rows` (a Pallas kernel on NVIDIA GPUs).
Routing: softmax over all experts in float32, top-k, weights renormalised over the k chosen.
The layer returns routing statistics; the LM sums them over all MoE layers into the Mixtral
load-balancing loss `E * sum_e f_e P_e` (`f_e`: fraction of tokens that chose e among their k
choices, so sum_e f_e = k; `P_e`: mean router probability).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm import kernels
from efficient_lm.layers.core import normal, param
from efficient_lm.layers.mlp import SwiGLU
from efficient_lm.layers.router import LinearRouter, RecurrentRouter


def route(logits_NE, top_k: int):
  """Returns (probs_NE, expert_idx_NK, weights_NK): float32, weights renormalised over the k."""
  probs = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(probs), top_k)
  # The chosen probabilities through a one-hot product, not top_k's own gradient: that one is a
  # scatter into [N, E], slow on GPUs next to this small dense product.
  chosen_NKE = jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype)
  top_p = jnp.einsum("ne,nke->nk", probs, chosen_NKE)
  return probs, idx, top_p / jnp.sum(top_p, axis=-1, keepdims=True)


def expert_mlp(x_ND, expert_idx_NK, weights_NK, w_gate_EDH, w_up_EDH, w_down_EHD, *, impl: str = "auto"):
  """Dropless dispatch: sort the N*k pairs by expert, ragged matmuls, sum each token's k rows.
  impl: the ragged-dot kernel ("auto", "xla", "tokamax"; see `efficient_lm.kernels`).
  The routing weight scales the expert's hidden activation (width H, not D) before the down
  projection, which is linear, so the result is sum_k w_k expert_k(x)."""
  n, k = expert_idx_NK.shape
  n_experts = w_gate_EDH.shape[0]
  flat_expert = expert_idx_NK.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)                 # sorted slot -> pair
  slot = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))   # pair -> slot
  x_sorted = _gather_pairs(x_ND, order, slot, k)
  w_sorted = _permute_rows(weights_NK.reshape(-1, 1), order, slot)
  sizes = jnp.bincount(flat_expert, length=n_experts).astype(jnp.int32)
  hid = w_gate_EDH.shape[-1]
  gate_up = kernels.ragged_dot(x_sorted, jnp.concatenate([w_gate_EDH, w_up_EDH], axis=-1), sizes, impl=impl)
  h = (jax.nn.silu(gate_up[:, :hid]) * gate_up[:, hid:] * w_sorted).astype(x_ND.dtype)
  y_sorted = kernels.ragged_dot(h, w_down_EHD, sizes, impl=impl)
  return _combine_pairs(y_sorted, order, slot, k)


# The dispatch permutation and the per-token sum are gathers forward AND backward (each is the
# other's transpose): autodiff of an indexed gather is a scatter-add, which on GPUs serialises on
# atomics and cost more than the expert matmuls.

def _sum_pairs(y_PD, slot_P, k):
  """Row t is the sum of the k rows of token t's pairs: sum_j y[slot[t * k + j]] (float32 sum)."""
  return jnp.sum(y_PD[slot_P].reshape(-1, k, y_PD.shape[-1]).astype(jnp.float32), axis=1).astype(y_PD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_pairs(x_ND, order_P, slot_P, k):
  """Token rows in expert order: row p is x[order[p] // k] (pair -> its token)."""
  return kernels.gather_rows(x_ND, order_P // k)


def _gather_pairs_fwd(x_ND, order_P, slot_P, k):
  return kernels.gather_rows(x_ND, order_P // k), (order_P, slot_P)


def _gather_pairs_bwd(k, res, g_PD):
  order_P, slot_P = res
  return _sum_pairs(g_PD, slot_P, k), None, None


_gather_pairs.defvjp(_gather_pairs_fwd, _gather_pairs_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _combine_pairs(y_PD, order_P, slot_P, k):
  """Per-token sums of the expert-ordered rows: the transpose of `_gather_pairs`."""
  return _sum_pairs(y_PD, slot_P, k)


def _combine_pairs_fwd(y_PD, order_P, slot_P, k):
  return _sum_pairs(y_PD, slot_P, k), (order_P, slot_P)


def _combine_pairs_bwd(k, res, g_ND):
  order_P, slot_P = res
  return kernels.gather_rows(g_ND, order_P // k), None, None


_combine_pairs.defvjp(_combine_pairs_fwd, _combine_pairs_bwd)


@jax.custom_vjp
def _permute_rows(x_PD, perm_P, inverse_P):
  """x[perm], where inverse is perm's inverse permutation."""
  return x_PD[perm_P]


def _permute_rows_fwd(x_PD, perm_P, inverse_P):
  return x_PD[perm_P], (perm_P, inverse_P)


def _permute_rows_bwd(res, g_PD):
  perm_P, inverse_P = res
  return g_PD[inverse_P], None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def routing_stats(probs_NE, expert_idx_NK):
  """Per-layer sums the load-balancing loss needs: (token, choice) pairs per expert, summed
  router probabilities, and the number of routed tokens."""
  counts = jnp.sum(jax.nn.one_hot(expert_idx_NK, probs_NE.shape[-1], dtype=jnp.float32), axis=(0, 1))
  return {"counts": counts, "prob_sum": jnp.sum(probs_NE, axis=0),
          "tokens": jnp.asarray(probs_NE.shape[0], jnp.float32)}


def load_balancing_loss(counts_E, prob_sum_E, n_tokens):
  """E * sum_e f_e P_e from summed statistics: counts of (token, choice) pairs per expert,
  summed router probabilities, and the number of routed tokens."""
  return counts_E.shape[0] * jnp.sum((counts_E / n_tokens) * (prob_sum_E / n_tokens))


class MoE(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, e, hid = cfg.d_model, cfg.n_experts, cfg.expert_hidden or cfg.mlp_hidden_size
    std = normal(cfg.init_std)
    if cfg.router == "recurrent":
      self.router = RecurrentRouter(d, e, cfg.router_dim, rngs=rngs, param_dtype=cfg.param_dtype, std=cfg.init_std)
    else:
      self.router = LinearRouter(d, e, rngs=rngs, param_dtype=cfg.param_dtype, std=cfg.init_std)
    self.w_gate = param(rngs, std, (e, d, hid), ("experts", "embed", "mlp"), cfg.param_dtype)
    self.w_up = param(rngs, std, (e, d, hid), ("experts", "embed", "mlp"), cfg.param_dtype)
    self.w_down = param(rngs, std, (e, hid, d), ("experts", "mlp", "embed"), cfg.param_dtype)
    self.shared = (SwiGLU(d, hid, rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std)
                   if cfg.shared_expert else None)
    self.top_k = cfg.top_k
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, h, router_state, cell):
    """h: [..., D] (normalised MoE input; also the router input). router_state: [N, R] or None.
    Returns (y like h, new router state, stats {"counts", "prob_sum", "tokens"})."""
    lead, d = h.shape[:-1], h.shape[-1]
    h_ND = h.reshape(-1, d).astype(self.dtype)
    logits, router_state = self.router(h_ND, router_state, cell)
    probs, idx, weights = route(logits, self.top_k)
    cast = lambda w: w[...].astype(self.dtype)
    y = expert_mlp(h_ND, idx, weights, cast(self.w_gate), cast(self.w_up), cast(self.w_down))
    if self.shared is not None:
      y = 0.5 * y + 0.5 * self.shared(h_ND)
    return y.reshape(*lead, d), router_state, routing_stats(probs, idx)
