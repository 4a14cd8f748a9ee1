"""Parameters with logical sharding names, dense layers and the token embedding.

Every parameter is created through `param`, which attaches LOGICAL axis names
(`vocab`, `embed`, `heads`, `kv`, `mlp`, `experts`, `state`, `conv`, or None for
axes that never shard). `efficient_lm/sharding.py` maps them to mesh axes in one
table; `nnx.get_partition_spec(nnx.state(model))` reads them back. Eager
sharding is off, so models build on a plain host without a mesh.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

init = nnx.initializers


class Buffer(nnx.Variable):
  """A fixed, untrained array (DiJiang's DCT projection): not an `nnx.Param`,
  so optimizers and parameter counts filtered on `nnx.Param` skip it."""


def param(rngs: nnx.Rngs, initializer, shape, axes, dtype) -> nnx.Param:
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  partitioned = nnx.with_partitioning(initializer, tuple(axes), eager_sharding=False)
  return nnx.Param(partitioned(rngs.params(), tuple(shape), jnp.dtype(dtype)))


def normal(std: float = 0.02):
  return init.normal(std)


def xavier_uniform(gain: float):
  """torch.nn.init.xavier_uniform_ with `gain` for a [in, out] kernel."""
  return init.variance_scaling(gain**2, "fan_avg", "uniform")


def scaled(initializer, factor: float):
  """`initializer` times `factor` (the out-projection rescale of Rodimus)."""
  return lambda key, shape, dtype: initializer(key, shape, dtype) * jnp.asarray(factor, dtype)


class Dense(nnx.Module):
  """y = x W (+ b), kernel [in, out] stored in `param_dtype`, computed in `dtype`."""

  def __init__(self, d_in: int, d_out: int, axes, *, rngs: nnx.Rngs, dtype, param_dtype,
               kernel_init=None, use_bias: bool = False, bias_init=init.zeros):
    self.kernel = param(rngs, kernel_init or normal(), (d_in, d_out), axes, param_dtype)
    self.bias = param(rngs, bias_init, (d_out,), axes[-1:], param_dtype) if use_bias else None
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding [vocab, d]; `attend` is the tied LM head (float32 logits)."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.embedding = param(rngs, normal(), (vocab_size, d_model), ("vocab", "embed"), param_dtype)
    self.dtype = jnp.dtype(dtype)

  def __call__(self, tokens_BT):
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD):
    return jnp.einsum("...d,vd->...v", x_BTD.astype(self.dtype), self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


def softplus_inverse(x):
  return x + jnp.log(-jnp.expm1(-x))


def mamba_dt_bias_init(dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
  """dt = exp(U(log dt_min, log dt_max)) clamped at dt_floor; returns softplus^{-1}(dt)."""
  def initializer(key, shape, dtype):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return softplus_inverse(jnp.maximum(dt, dt_floor)).astype(dtype)
  return initializer


def dropout_fn(x, rate: float, key):
  """Inverted dropout: zero each element with probability `rate`, scale the rest by 1/(1-rate)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)
