"""Shared pieces for the fast-path tests: a fake tokamax that records its calls and computes
with the XLA ops (so the tokamax branches run on any CPU), and a naive attention reference."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from efficient_lm import kernels


def fake_tokamax(calls: list):
  def ragged_dot(lhs, rhs, group_sizes, preferred_element_type=None, **kw):
    calls.append("ragged_dot")
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)

  def dot_product_attention(q, k, v, mask=None, *, is_causal=False, local_window_size=None, scale=None, **kw):
    calls.append("attention")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        local_window_size=local_window_size, scale=scale)

  return types.SimpleNamespace(ragged_dot=ragged_dot, dot_product_attention=dot_product_attention,
                               __version_info__=(0, 0, 17))


def pretend(monkeypatch, backend: str, kind: str = "", major: int = 0, tokamax=None):
  """Makes the dispatch see another platform (and tokamax, or its absence)."""
  monkeypatch.setattr(kernels, "_platform", lambda: (backend, kind, major))
  monkeypatch.setattr(kernels, "tokamax_module", lambda: tokamax)


def reference_attention(q_BTNH, k_BSNH, v_BSNH, seg_BT, window, scale):
  """Float32 softmax attention with the models.md mask written out: query t sees key s iff
  0 <= t - s <= w (w = inf without a window) and both lie in the same segment."""
  q, k, v = (x.astype(jnp.float32) for x in (q_BTNH, k_BSNH, v_BSNH))
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  t_idx, s_idx = jnp.arange(q.shape[1])[:, None], jnp.arange(k.shape[1])[None, :]
  ok = t_idx - s_idx >= 0
  if window is not None:
    ok = ok & (t_idx - s_idx <= window)
  ok = ok[None, None]
  if seg_BT is not None:
    ok = ok & (seg_BT[:, None, :, None] == seg_BT[:, None, None, :])
  p = jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", p, v)
