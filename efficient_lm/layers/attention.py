"""Causal softmax attention through `efficient_lm.kernels.dot_product_attention`: cuDNN on NVIDIA
GPUs, tokamax on TPU, XLA elsewhere (decode steps always take XLA).

One module covers the three variants the models need:
- global attention (Transformer++), with grouped key/value heads;
- sliding-window attention: query t sees keys s with 0 <= t - s <= w, which is exactly
  `local_window_size=(w, 0)` with `is_causal=True`;
- SW-SKA (Rodimus+): one shared key head, one value head per query head. The op wants as many
  key heads as value heads, so the one key head is broadcast.
`use_bias` adds biases to the four projections (the GPT-NeoX host).
Training with `dropout=(rate, key)` drops attention probabilities (nanoGPT's attn_dropout); the
fused kernels take no dropout, so that path is plain XLA with the [B, N, T, S] probabilities.
Packed documents: a mask from segment_ids, and RoPE positions restart in each segment.
Decode caches: global keeps `[B, max_len, ...]` (grows with context); windowed keeps a ring of
the last w keys and values (constant); the token being decoded is attended in addition.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm import kernels
from efficient_lm.layers.core import Dense, dropout_fn, normal, scaled
from efficient_lm.layers.rope import apply_rope


class Attention(nnx.Module):

  def __init__(self, d_model: int, n_heads: int, n_k_heads: int, n_v_heads: int, head_dim: int, *,
               window: int | None, rope_base: float, rope_fraction: float, rngs: nnx.Rngs, dtype,
               param_dtype, std: float = 0.02, out_scale: float = 1.0, use_bias: bool = False):
    if n_v_heads % n_k_heads or n_heads % n_v_heads:
      raise ValueError(f"heads: need n_k_heads | n_v_heads | n_heads, got {n_k_heads}, {n_v_heads}, {n_heads}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias)
    k_axes = ("embed", "kv") if n_k_heads == 1 else ("embed", "heads")
    self.q_proj = Dense(d_model, n_heads * head_dim, ("embed", "heads"), kernel_init=normal(std), **kw)
    self.k_proj = Dense(d_model, n_k_heads * head_dim, k_axes, kernel_init=normal(std), **kw)
    self.v_proj = Dense(d_model, n_v_heads * head_dim, ("embed", "heads"), kernel_init=normal(std), **kw)
    self.o_proj = Dense(n_heads * head_dim, d_model, ("heads", "embed"),
                        kernel_init=scaled(normal(std), out_scale), **kw)
    self.n_heads, self.n_k_heads, self.n_v_heads, self.head_dim = n_heads, n_k_heads, n_v_heads, head_dim
    self.window = window
    self.rope_base = rope_base
    self.rot_dim = int(head_dim * rope_fraction)
    self.dtype = jnp.dtype(dtype)

  def _qkv(self, x_BTD, pos_BT):
    b, t, _ = x_BTD.shape
    q = self.q_proj(x_BTD).reshape(b, t, self.n_heads, self.head_dim)
    k = self.k_proj(x_BTD).reshape(b, t, self.n_k_heads, self.head_dim)
    v = self.v_proj(x_BTD).reshape(b, t, self.n_v_heads, self.head_dim)
    q = apply_rope(q, pos_BT, self.rope_base, self.rot_dim)
    k = apply_rope(k, pos_BT, self.rope_base, self.rot_dim)
    return q, k, v

  def _attend(self, q, k, v, mask, is_causal, window, impl="auto", dropout=None):
    k = jnp.repeat(k, self.n_v_heads // self.n_k_heads, axis=2)  # SW-SKA: share the key head
    scale = self.head_dim ** -0.5
    if dropout is None:
      o = kernels.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, window=window, scale=scale,
                                        impl=impl)
    else:
      o = attention_with_dropout(q, k, v, mask=mask, window=window, scale=scale, dropout=dropout)
    return self.o_proj(o.reshape(*o.shape[:2], -1))

  def __call__(self, x_BTD, seg_BT, pos_BT, dropout=None):
    """`dropout`: None, or (rate, key) in training: dropout on the attention probabilities."""
    q, k, v = self._qkv(x_BTD, pos_BT)
    mask = None if seg_BT is None else (seg_BT[:, :, None] == seg_BT[:, None, :])[:, None]
    return self._attend(q, k, v, mask, True, self.window, dropout=dropout)

  def prefill(self, x_BTD, pos_BT, max_len: int):
    """Forward over one document per row, returning the decode cache after it."""
    q, k, v = self._qkv(x_BTD, pos_BT)
    y = self._attend(q, k, v, None, True, self.window)
    t = x_BTD.shape[1]
    if self.window is None:
      pad = ((0, 0), (0, max_len - t), (0, 0), (0, 0))
      return y, {"k": jnp.pad(k, pad), "v": jnp.pad(v, pad)}
    w = self.window
    # Ring buffer: slot p % w holds position p; keep the last w positions (zeros before 0).
    pad = ((0, 0), (w, 0), (0, 0), (0, 0))
    order = (jnp.arange(w) - t) % w
    return y, {"k": jnp.pad(k, pad)[:, -w:][:, order], "v": jnp.pad(v, pad)[:, -w:][:, order]}

  def step(self, x_BD, cache, pos):
    b = x_BD.shape[0]
    q, k, v = self._qkv(x_BD[:, None], jnp.full((b, 1), pos, jnp.int32))
    if self.window is None:
      k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, axis=1)
      v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, axis=1)
      valid_S = jnp.arange(k_all.shape[1]) <= pos
      new_cache = {"k": k_all, "v": v_all}
    else:
      w = self.window
      k_all = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)
      v_all = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
      valid_S = jnp.concatenate([jnp.arange(w) < pos, jnp.ones((1,), bool)])  # slot s holds a token once pos > s
      slot = pos % w
      new_cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), slot, axis=1),
                   "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), slot, axis=1)}
    y = self._attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype), valid_S[None, None, None, :], False, None,
                     impl="xla")
    return y[:, 0], new_cache

  def init_cache(self, batch_size: int, max_len: int):
    s = max_len if self.window is None else self.window
    return {"k": jnp.zeros((batch_size, s, self.n_k_heads, self.head_dim), self.dtype),
            "v": jnp.zeros((batch_size, s, self.n_v_heads, self.head_dim), self.dtype)}


def attention_with_dropout(q_BTNH, k_BTKH, v_BTKH, *, mask, window, scale, dropout):
  """Causal softmax attention (keys s with 0 <= t - s <= window) with inverted dropout on the
  probabilities; grouped key/value heads serve N / K query heads each, as in
  `jax.nn.dot_product_attention`. mask: bool, broadcastable to [B, N, T, T]."""
  rate, key = dropout
  n, kv = q_BTNH.shape[2], k_BTKH.shape[2]
  k_BTNH, v_BTNH = (jnp.repeat(x, n // kv, axis=2) for x in (k_BTKH, v_BTKH))
  logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH, preferred_element_type=jnp.float32) * scale
  t = q_BTNH.shape[1]
  lag_TS = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
  allowed = (lag_TS >= 0) & ((lag_TS <= window) if window is not None else True)
  if mask is not None:
    allowed = allowed & mask
  probs = jax.nn.softmax(jnp.where(allowed, logits_BNTS, -jnp.inf), axis=-1)
  probs = dropout_fn(probs, rate, key).astype(v_BTNH.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v_BTNH, preferred_element_type=jnp.float32).astype(v_BTNH.dtype)
