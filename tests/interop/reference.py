"""Independent float64 NumPy forwards of the peers' models, written from their official code
(torch naming and layouts), and synthetic state dicts in their naming."""
from __future__ import annotations

import numpy as np


def silu(x):
  return x / (1.0 + np.exp(-x))


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
  return np.logaddexp(0.0, x)


def rmsnorm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def linear(x, w, b=None):
  """torch F.linear: x @ w.T (+ b)."""
  y = x @ w.T
  return y if b is None else y + b


def causal_conv(x_BTC, w_C1K, b=None):
  """torch Conv1d(groups=C, padding=K-1)(x)[..., :T] on [B, T, C]."""
  k, t = w_C1K.shape[-1], x_BTC.shape[1]
  xp = np.pad(x_BTC, ((0, 0), (k - 1, 0), (0, 0)))
  y = sum(xp[:, j:j + t] * w_C1K[:, 0, j] for j in range(k))
  return y if b is None else y + b


def rope(x_BTHK, base):
  """Rotate-half RoPE on the full head dim, positions 0..T-1."""
  t, dim = x_BTHK.shape[1], x_BTHK.shape[-1]
  inv = 1.0 / base ** (np.arange(0, dim, 2) / dim)
  ang = np.arange(t)[:, None] * inv
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  half = dim // 2
  rot = np.concatenate([-x_BTHK[..., half:], x_BTHK[..., :half]], -1)
  return x_BTHK * cos[None, :, None] + rot * sin[None, :, None]


def randn(rng, shape, scale):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


# --- Rodimus (codefuse-ai/rodimus modeling_rodimus.py, modules/rodimus_flow.py, rodimus_attention.py, mlp.py)

def rodimus_sizes(d, mem, ffn_ratio=4 / 3):
  di = 8 * -(-int(2 * d) // 8)
  return di, max(d // 64, 16), 8 * -(-int(d * ffn_ratio) // 8)


def rodimus_state_dict(rng, *, block_type, d, n_layer, vocab, mem, heads=None, tied=True):
  di, r, f = rodimus_sizes(d, mem)
  sd = {"model.embeddings.weight": randn(rng, (vocab, d), 0.5), "model.norm_f.weight": 1 + randn(rng, (d,), 0.1)}
  if not tied:
    sd["lm_head.weight"] = randn(rng, (vocab, d), 0.2)
  for i in range(n_layer):
    p, q = f"model.layers.{i}.", f"model.layers.{i}.mixer."
    sd.update({
        p + "mixer_norm.weight": 1 + randn(rng, (d,), 0.1),
        q + "fc.weight": randn(rng, (2 * di, d), d ** -0.5),
        q + "inner_mixer.short_conv.conv1d.weight": randn(rng, (di, 1, 4), 0.5),
        q + "inner_mixer.short_conv.conv1d.bias": randn(rng, (di,), 0.2),
        q + "inner_mixer.residual_weight": 1 + randn(rng, (di,), 0.2),
        q + "inner_mixer.in_proj.weight": randn(rng, (2 * mem, di), di ** -0.5),
        q + "inner_mixer.ch_gate_proj.0.weight": randn(rng, (r, di), di ** -0.5),
        q + "inner_mixer.ch_gate_proj.1.weight": randn(rng, (di, r), r ** -0.5),
        q + "inner_mixer.ch_gate_proj.1.bias": randn(rng, (di,), 0.5),
        q + "inner_mixer.mem_gate_proj.weight": randn(rng, (2 * mem, di), di ** -0.5),
        q + "inner_mixer.mem_gate_proj.bias": randn(rng, (2 * mem,), 1.0),
        q + "act_norm.weight": 1 + randn(rng, (di,), 0.1),
        q + "out_proj.weight": randn(rng, (d, di), di ** -0.5),
    })
    if block_type == "rodimus_plus":
      hd = d // heads
      sd.update({
          p + "attn_norm.weight": 1 + randn(rng, (d,), 0.1),
          p + "attn.q_proj.weight": randn(rng, (d, d), d ** -0.5),
          p + "attn.k_proj.weight": randn(rng, (hd, d), d ** -0.5),
          p + "attn.v_proj.weight": randn(rng, (d, d), d ** -0.5),
          p + "attn.out_proj.weight": randn(rng, (d, d), d ** -0.5),
          p + "ffn_norm.weight": 1 + randn(rng, (d,), 0.1),
          p + "ffn.fc.weight": randn(rng, (2 * f, d), d ** -0.5),
          p + "ffn.out_proj.weight": randn(rng, (d, f), f ** -0.5),
      })
  return sd


def rodimus_mixer(sd, prefix, h_BTD, *, mem, norm_eps=1e-5, k_eps=1e-12):
  """RodimusFlow.forward in float64 (prefix: 'model.layers.i.mixer.')."""
  w = lambda n: sd[prefix + n].astype(np.float64)
  x, z = np.split(linear(h_BTD, w("fc.weight")), 2, -1)
  xc = silu(causal_conv(x, w("inner_mixer.short_conv.conv1d.weight"), w("inner_mixer.short_conv.conv1d.bias")))
  r, k = np.split(linear(xc, w("inner_mixer.in_proj.weight")), 2, -1)
  u = sigmoid(linear(linear(x, w("inner_mixer.ch_gate_proj.0.weight")), w("inner_mixer.ch_gate_proj.1.weight"),
                     w("inner_mixer.ch_gate_proj.1.bias"))) * x
  sel, tau = np.split(linear(xc, w("inner_mixer.mem_gate_proj.weight"), w("inner_mixer.mem_gate_proj.bias")), 2, -1)
  sel, tau = softplus(sel), sigmoid(tau)
  k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), k_eps) * sel ** tau
  g = -sel * tau
  b, t, _ = h_BTD.shape
  state = np.zeros((b, mem, u.shape[-1]))
  o = np.zeros_like(u)
  for i in range(t):   # GLA: S_t = diag(exp g_t) S_{t-1} + k_t^T u_t;  o_t = (r_t / sqrt(m)) S_t
    state = np.exp(g[:, i])[:, :, None] * state + k[:, i, :, None] * u[:, i, None, :]
    o[:, i] = np.einsum("bm,bmv->bv", r[:, i] * mem ** -0.5, state)
  o = o + xc * w("inner_mixer.residual_weight")
  return linear(rmsnorm(o * silu(z), w("act_norm.weight"), norm_eps), w("out_proj.weight"))


def sw_ska(sd, prefix, h_BTD, *, heads, window_size, base=10000.0):
  """SlideWindowSharedKeyAttention: one key head, window (W // 2, 0), rotate-half RoPE."""
  w = lambda n: sd[prefix + n].astype(np.float64)
  b, t, d = h_BTD.shape
  hd = d // heads
  q = rope(linear(h_BTD, w("q_proj.weight")).reshape(b, t, heads, hd), base)
  k = rope(linear(h_BTD, w("k_proj.weight")).reshape(b, t, 1, hd), base)
  v = linear(h_BTD, w("v_proj.weight")).reshape(b, t, heads, hd)
  s = np.einsum("bthd,bsd->bhts", q, k[:, :, 0]) * hd ** -0.5
  lag = np.arange(t)[:, None] - np.arange(t)[None, :]
  s = np.where((lag >= 0) & (lag <= window_size // 2), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhts,bshd->bthd", p, v).reshape(b, t, d)
  return linear(o, w("out_proj.weight"))


def rodimus_lm(sd, tokens_BT, *, block_type, n_layer, mem, heads=None, window_size=None, eps=1e-5, tied=True):
  """RodimusForCausalLM.forward (prenorm residual bookkeeping unrolled) in float64."""
  w = lambda n: sd[n].astype(np.float64)
  x = w("model.embeddings.weight")[tokens_BT]
  for i in range(n_layer):
    p = f"model.layers.{i}."
    r1 = x + rodimus_mixer(sd, p + "mixer.", rmsnorm(x, w(p + "mixer_norm.weight"), eps), mem=mem, norm_eps=eps)
    if block_type == "rodimus":
      x = r1
      continue
    a = sw_ska(sd, p + "attn.", rmsnorm(r1, w(p + "attn_norm.weight"), eps), heads=heads, window_size=window_size)
    hx, hg = np.split(linear(rmsnorm(r1 + a, w(p + "ffn_norm.weight"), eps), w(p + "ffn.fc.weight")), 2, -1)
    x = r1 + linear(silu(hg) * hx, w(p + "ffn.out_proj.weight"))
  head = w("model.embeddings.weight") if tied else w("lm_head.weight")
  return linear(rmsnorm(x, w("model.norm_f.weight"), eps), head)


# --- fla DeltaNet (fla/models/delta_net/modeling_delta_net.py, fla/layers/delta_net.py)

def fla_deltanet_state_dict(rng, *, d, n_layer, vocab, heads, expand_k, expand_v, use_gate, mlp_hidden, tied):
  kdim, vdim = int(d * expand_k), int(d * expand_v)
  sd = {"model.embeddings.weight": randn(rng, (vocab, d), 0.5), "model.norm.weight": 1 + randn(rng, (d,), 0.1)}
  if not tied:
    sd["lm_head.weight"] = randn(rng, (vocab, d), 0.2)
  for i in range(n_layer):
    p = f"model.layers.{i}."
    sd.update({
        p + "attn_norm.weight": 1 + randn(rng, (d,), 0.1),
        p + "attn.q_proj.weight": randn(rng, (kdim, d), d ** -0.5),
        p + "attn.k_proj.weight": randn(rng, (kdim, d), d ** -0.5),
        p + "attn.v_proj.weight": randn(rng, (vdim, d), d ** -0.5),
        p + "attn.b_proj.weight": randn(rng, (heads, d), d ** -0.5),
        p + "attn.q_conv1d.weight": randn(rng, (kdim, 1, 4), 0.5),
        p + "attn.k_conv1d.weight": randn(rng, (kdim, 1, 4), 0.5),
        p + "attn.v_conv1d.weight": randn(rng, (vdim, 1, 4), 0.5),
        p + "attn.o_norm.weight": 1 + randn(rng, (vdim // heads,), 0.1),
        p + "attn.o_proj.weight": randn(rng, (d, vdim), vdim ** -0.5),
        p + "mlp_norm.weight": 1 + randn(rng, (d,), 0.1),
        p + "mlp.gate_proj.weight": randn(rng, (mlp_hidden, d), d ** -0.5),
        p + "mlp.up_proj.weight": randn(rng, (mlp_hidden, d), d ** -0.5),
        p + "mlp.down_proj.weight": randn(rng, (d, mlp_hidden), mlp_hidden ** -0.5),
    })
    if use_gate:
      sd[p + "attn.g_proj.weight"] = randn(rng, (vdim, d), d ** -0.5)
  return sd


def fla_deltanet_lm(sd, tokens_BT, *, n_layer, heads, use_gate, tied, eps=1e-6):
  w = lambda n: sd[n].astype(np.float64)
  x = w("model.embeddings.weight")[tokens_BT]
  b, t, _ = x.shape
  for i in range(n_layer):
    p = f"model.layers.{i}."
    h = rmsnorm(x, w(p + "attn_norm.weight"), eps)
    q, k, v = (silu(causal_conv(linear(h, w(p + f"attn.{n}_proj.weight")), w(p + f"attn.{n}_conv1d.weight")))
               for n in "qkv")
    q, k, v = (a.reshape(b, t, heads, -1) for a in (q, k, v))
    q, k = (a / np.sqrt(np.sum(a * a, -1, keepdims=True) + 1e-6) for a in (q, k))
    beta = sigmoid(linear(h, w(p + "attn.b_proj.weight")))
    kd, vd = q.shape[-1], v.shape[-1]
    state = np.zeros((b, heads, kd, vd))
    o = np.zeros((b, t, heads, vd))
    for s in range(t):   # S_t = S_{t-1} + beta k (v - S^T k)^T;  o_t = S_t^T q_t K^-0.5
      kt, vt, bt = k[:, s], v[:, s], beta[:, s]
      err = vt - np.einsum("bhk,bhkv->bhv", kt, state)
      state = state + bt[..., None, None] * kt[..., :, None] * err[..., None, :]
      o[:, s] = np.einsum("bhk,bhkv->bhv", q[:, s] * kd ** -0.5, state)
    o = rmsnorm(o, w(p + "attn.o_norm.weight"), eps)
    if use_gate:
      o = o * silu(linear(h, w(p + "attn.g_proj.weight")).reshape(b, t, heads, vd))
    x = x + linear(o.reshape(b, t, -1), w(p + "attn.o_proj.weight"))
    h = rmsnorm(x, w(p + "mlp_norm.weight"), eps)
    x = x + linear(silu(linear(h, w(p + "mlp.gate_proj.weight"))) * linear(h, w(p + "mlp.up_proj.weight")),
                   w(p + "mlp.down_proj.weight"))
  head = w("model.embeddings.weight") if tied else w("lm_head.weight")
  return linear(rmsnorm(x, w("model.norm.weight"), eps), head)
