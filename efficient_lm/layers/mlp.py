"""Dense MLPs: SwiGLU `down(silu(gate(x)) * up(x))` and the GPT-NeoX GELU MLP."""
from __future__ import annotations

import jax
from flax import nnx

from efficient_lm.layers.core import Dense, normal, scaled


class SwiGLU(nnx.Module):
  """Loading note: a fused `fc(h).chunk(2) -> (x, gate)` (Rodimus+) maps to up = first half,
  gate = second half."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               std: float = 0.02, out_scale: float = 1.0):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = Dense(d_model, hidden, ("embed", "mlp"), kernel_init=normal(std), **kw)
    self.up = Dense(d_model, hidden, ("embed", "mlp"), kernel_init=normal(std), **kw)
    self.down = Dense(hidden, d_model, ("mlp", "embed"), kernel_init=scaled(normal(std), out_scale), **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class GeluMLP(nnx.Module):
  """GPT-NeoX MLP: dense_4h_to_h(gelu(dense_h_to_4h(x))), both with bias; exact GELU unless
  `approximate` (the tanh form: HF's gelu_new / gelu_pytorch_tanh / gelu_fast)."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype, std: float = 0.02,
               approximate: bool = False):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=True)
    self.up = Dense(d_model, hidden, ("embed", "mlp"), kernel_init=normal(std), **kw)
    self.down = Dense(hidden, d_model, ("mlp", "embed"), kernel_init=normal(std), **kw)
    self.approximate = approximate

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x), approximate=self.approximate))
