"""MoE routers. `LinearRouter` (SMoE): logits = W_r h. `RecurrentRouter` (RMoE): per-layer
x_l = W1_l h, r_l = cell(x_l, r_{l-1}), logits_l = W2_l r_l, where ONE `RouterCell` (GRU, or a
tanh RNN for the ablation) is shared by all layers and r flows from layer to layer with
gradients (r_0 = 0, per token). Routers run in float32; init (ours) normal(0, 0.02), biases 0."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.layers.core import init, normal, param


class RouterCell(nnx.Module):
  """torch.nn.GRUCell (gate order r, z, n) or a tanh RNN cell, float32, [N, R] states."""

  def __init__(self, dim: int, cell: str, *, rngs: nnx.Rngs, std: float = 0.02):
    gates = 3 if cell == "gru" else 1
    self.w_i = param(rngs, normal(std), (dim, gates * dim), (None, None), jnp.float32)
    self.w_h = param(rngs, normal(std), (dim, gates * dim), (None, None), jnp.float32)
    self.b_i = param(rngs, init.zeros, (gates * dim,), (None,), jnp.float32)
    self.b_h = param(rngs, init.zeros, (gates * dim,), (None,), jnp.float32)
    self.cell = cell

  def __call__(self, x_NR, h_NR):
    gi = x_NR @ self.w_i[...] + self.b_i[...]
    gh = h_NR @ self.w_h[...] + self.b_h[...]
    if self.cell == "rnn":
      return jnp.tanh(gi + gh)
    i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
    r, z = jax.nn.sigmoid(i_r + h_r), jax.nn.sigmoid(i_z + h_z)
    n = jnp.tanh(i_n + r * h_n)
    return (1.0 - z) * n + z * h_NR


class LinearRouter(nnx.Module):

  def __init__(self, d_model: int, n_experts: int, *, rngs: nnx.Rngs, param_dtype, std: float = 0.02):
    self.w = param(rngs, normal(std), (d_model, n_experts), ("embed", None), param_dtype)

  def __call__(self, h_ND, state_NR, cell):
    return h_ND.astype(jnp.float32) @ self.w[...].astype(jnp.float32), state_NR


class RecurrentRouter(nnx.Module):

  def __init__(self, d_model: int, n_experts: int, dim: int, *, rngs: nnx.Rngs, param_dtype, std: float = 0.02):
    self.w_in = param(rngs, normal(std), (d_model, dim), ("embed", None), param_dtype)
    self.w_out = param(rngs, normal(std), (dim, n_experts), (None, None), param_dtype)

  def __call__(self, h_ND, state_NR, cell: RouterCell):
    x = h_ND.astype(jnp.float32) @ self.w_in[...].astype(jnp.float32)
    state = cell(x, state_NR)
    return state @ self.w_out[...].astype(jnp.float32), state
