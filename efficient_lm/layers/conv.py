"""Depthwise causal short convolution with a decode cache of the last `size - 1` inputs.

y_t = sum_j w[j] x_{t - (size - 1) + j} (+ b): PyTorch's Conv1d(padding=size-1) truncated
to T, so `w[j]` loads from torch weight `[C, 1, size][:, 0, j]`. Inputs from another
segment (packed documents) count as zeros, so the conv restarts at every boundary.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.layers.core import init, normal, param


def torch_conv_init(fan_in: int):
  """PyTorch Conv1d's default for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def qkv_conv_init(cfg):
  """The initializer of a mixer's q/k/v short-conv weights: `cfg.conv_init`."""
  return torch_conv_init(cfg.conv_size) if cfg.conv_init == "torch" else normal(cfg.init_std)


def causal_conv(x_BTC, w_KC, seg_BT=None):
  """Depthwise causal conv (no bias); taps crossing a segment boundary are dropped."""
  size, t = w_KC.shape[0], x_BTC.shape[1]
  y = x_BTC * w_KC[-1]
  for lag in range(1, min(size, t)):
    shifted = jnp.pad(x_BTC[:, :-lag], ((0, 0), (lag, 0), (0, 0)))
    if seg_BT is not None:
      same = jnp.pad(seg_BT[:, lag:] == seg_BT[:, :-lag], ((0, 0), (lag, 0)))
      shifted = shifted * same[..., None].astype(shifted.dtype)
    y = y + shifted * w_KC[-1 - lag]
  return y


class ShortConv(nnx.Module):
  """Depthwise causal conv over channels `C`, optional bias and SiLU."""

  def __init__(self, channels: int, size: int, channel_axis: str, *, rngs: nnx.Rngs, dtype, param_dtype,
               use_bias: bool, activation: bool, weight_init=None):
    self.weight = param(rngs, weight_init or normal(), (size, channels), ("conv", channel_axis), param_dtype)
    self.bias = (param(rngs, weight_init or init.zeros, (channels,), (channel_axis,), param_dtype)
                 if use_bias else None)
    self.size, self.channels = size, channels
    self.activation = activation
    self.dtype = jnp.dtype(dtype)

  def _finish(self, y):
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return jax.nn.silu(y) if self.activation else y

  def __call__(self, x_BTC, seg_BT=None):
    """Returns (y_BTC, cache_BKC): the cache holds the last size-1 inputs (zeros before t=0)."""
    x = x_BTC.astype(self.dtype)
    y = causal_conv(x, self.weight[...].astype(self.dtype), seg_BT)
    padded = jnp.pad(x, ((0, 0), (self.size - 1, 0), (0, 0)))
    return self._finish(y), padded[:, -(self.size - 1):]

  def step(self, x_BC, cache_BKC):
    window = jnp.concatenate([cache_BKC, x_BC[:, None].astype(cache_BKC.dtype)], axis=1)
    y = jnp.einsum("bkc,kc->bc", window, self.weight[...].astype(self.dtype))
    return self._finish(y), window[:, 1:]

  def init_cache(self, batch_size: int):
    return jnp.zeros((batch_size, self.size - 1, self.channels), self.dtype)


def qkv_convs(size: int, qk_channels: int, v_channels: int, **kw) -> nnx.List:
  """FLA's short convs of a linear-attention layer: one each on q, k, v (depthwise, no bias, SiLU).
  kw: ShortConv's rngs, dtype, param_dtype, weight_init."""
  conv = lambda c: ShortConv(c, size, "heads", use_bias=False, activation=True, **kw)
  return nnx.List([conv(qk_channels), conv(qk_channels), conv(v_channels)])


def apply_convs(convs, xs, seg_BT=None, caches=None):
  """(ys, new caches) of convs on xs: over a sequence (restarting at `seg_BT` boundaries) or, given
  the decode `caches`, for one token."""
  if caches is None:
    outs = [conv(x, seg_BT) for conv, x in zip(convs, xs)]
  else:
    outs = [conv.step(x, cache) for conv, x, cache in zip(convs, xs, caches)]
  return [y for y, _ in outs], [cache for _, cache in outs]
