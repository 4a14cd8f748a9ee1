"""RMSNorm (two L2 conventions live beside it) and LayerNorm; statistics always in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.layers.core import init, param


def rms_norm(x, scale, eps: float):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * scale.astype(jnp.float32)


def l2norm_torch(x, eps: float):
  """`x / max(||x||, eps)` (torch F.normalize; Rodimus's keys), in float32."""
  x32 = x.astype(jnp.float32)
  return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)


def l2norm_fla(x, eps: float = 1e-6):
  """`x / sqrt(sum x^2 + eps)` (FLA's l2norm; DeltaNet's q and k), in float32."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """Normalises the last axis; returns the compute dtype. Gated variants are written at the
  call site (`norm(o * silu(z))` for Rodimus, `norm(o) * silu(g)` for FLA) since they differ."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.scale = param(rngs, init.ones, (dim,), (None,), param_dtype)
    self.eps = eps
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with bias (the GPT-NeoX host of DiJiang)."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.scale = param(rngs, init.ones, (dim,), (None,), param_dtype)
    self.bias = param(rngs, init.zeros, (dim,), (None,), param_dtype)
    self.eps = eps
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


def make_norm(cfg, dim: int, rngs: nnx.Rngs):
  cls = LayerNorm if cfg.norm == "layer" else RMSNorm
  return cls(dim, cfg.norm_eps, rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
