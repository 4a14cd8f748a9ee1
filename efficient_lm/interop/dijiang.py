"""`convert_to_dijiang`: a loaded softmax model (the GPT-NeoX host) -> the DiJiang model of models.md.

Kept (copied exactly): embeddings, LM head, every LayerNorm, the MLP, and per layer the
attention's q/k/v projections (re-fused into DiJiang's `qkv` in GPT-NeoX's per-head `[H, 3, p]`
layout, so a Pythia model converts back to its own fused `query_key_value`) and its output
projection (`dense`). Biases the host lacks are zeros.
Added: `gate` (W_G, xavier uniform gain 2^-2.5), the GroupNorm affine (ones, zeros), the fixed
DCT projection and Gaussian quantiles (buffers, from `seed`), and with `learn_decay` the
per-head decay logits. Everything but the projection is then fine-tuned (models.md).

`calibrate_dijiang` (ours, not in the official code) then sets the new parameters from one batch
of the teacher instead of leaving them at their generic init: per-head decays fitted to the
teacher's attention output, a constant gate and a moment-matched GroupNorm. In a CPU study
(experiments/results/dijiang/cpu_study) it took the gap after 5% of the teacher's steps from
+0.73 to +0.36-0.40 nats. `transfer_attention` (ours, after LoLCATs) then trains the mixers to
reproduce the teacher's attention outputs layer by layer; in the same study 10 of the 50 steps
spent on it gained 0.01 nats, 25 lost 0.08 (cpu_study/README.md), so the script uses it only
when asked (`experiments/dijiang_conversion.py --transfer-steps`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_lm import kernels
from efficient_lm.configs import get_config
from efficient_lm.layers.mixers.dijiang import GROUP_NORM_EPS, DiJiang, group_norm
from efficient_lm.layers.norms import LayerNorm
from efficient_lm.layers.rope import positions
from efficient_lm.models import LM
from pallas_kernels import gla


def _check_host(cfg, who: str = "convert_to_dijiang: the model"):
  problems = []
  if set(cfg.layer_kinds) != {"transformer"}:
    problems.append(f"layer kinds {sorted(set(cfg.layer_kinds))} (need global softmax attention everywhere)")
  if cfg.n_experts:
    problems.append("MoE layers")
  if (cfg.n_kv_heads or cfg.n_heads) != cfg.n_heads:
    problems.append(f"grouped key/value heads (n_kv_heads={cfg.n_kv_heads})")
  if not cfg.parallel_residual:
    problems.append("sequential residual (DiJiang's host uses the parallel residual)")
  if cfg.mlp_kind == "swiglu":
    problems.append("SwiGLU MLP (DiJiang's host uses the GELU MLP)")
  if problems:
    raise ValueError(f"{who} is not a GPT-NeoX-style host: " + "; ".join(problems))


def convert_to_dijiang(model: LM, *, seed: int = 0, learn_decay: bool = False, **overrides) -> LM:
  """The DiJiang model with `model`'s pretrained weights and freshly initialised new parameters."""
  src = model.config
  _check_host(src)
  cfg = get_config(src, kind="dijiang", layer_pattern=(), mlp_hidden=src.mlp_hidden_size,
                   dijiang_learn_decay=learn_decay, **overrides)
  out = LM(cfg, rngs=nnx.Rngs(seed))
  d, h, p = cfg.d_model, cfg.n_heads, cfg.attn_head_dim

  def copy(dst, value):
    dst.set_value(jnp.asarray(value, dst.get_value().dtype))

  copy(out.embed.embedding, model.embed.embedding[...])
  if not src.tie_embeddings:
    copy(out.lm_head, model.lm_head[...])
  for name in ("scale", "bias"):
    if hasattr(model.norm_f, name):
      copy(getattr(out.norm_f, name), getattr(model.norm_f, name)[...])
  for new, old in zip(out.blocks, model.blocks):
    att = old.mixer
    kernels = [getattr(att, n).kernel[...].reshape(d, h, 1, p) for n in ("q_proj", "k_proj", "v_proj")]
    copy(new.mixer.qkv.kernel, jnp.concatenate(kernels, axis=2).reshape(d, 3 * h * p))
    biases = [jnp.zeros((h, 1, p)) if getattr(att, n).bias is None else getattr(att, n).bias[...].reshape(h, 1, p)
              for n in ("q_proj", "k_proj", "v_proj")]
    copy(new.mixer.qkv.bias, jnp.concatenate(biases, axis=1).reshape(3 * h * p))
    copy(new.mixer.dense.kernel, att.o_proj.kernel[...])
    copy(new.mixer.dense.bias, jnp.zeros((d,)) if att.o_proj.bias is None else att.o_proj.bias[...])
    for layer in ("up", "down"):
      copy(getattr(new.mlp, layer).kernel, getattr(old.mlp, layer).kernel[...])
      copy(getattr(new.mlp, layer).bias, getattr(old.mlp, layer).bias[...])
    for norm in ("norm1", "norm2"):
      for name in ("scale", "bias"):
        if hasattr(getattr(old, norm), name):
          copy(getattr(getattr(new, norm), name), getattr(getattr(old, norm), name)[...])
  return out


# calibrate_dijiang's decay grid: gamma = 1 - 1/n, n a head's time constant in tokens. The CPU
# study's char-level teacher (d 128) picked n 1.5-8; up to 512 covers DiJiang's own default decays
# (n 32..512) for heads that look far back.
DECAY_GRID = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 512)
# The constant gate's kernel is kappa / scale_i: its d products cancel exactly only in exact
# arithmetic, so rounding (bf16 on GPU: ~0.04 kappa at d 384) grows with kappa. Beyond this the
# gate is left at its random init.
MAX_GATE_KAPPA = 10.0


def teacher_attention_io(teacher: LM, tokens_BT):
  """Yields, per layer of the softmax `teacher` on `tokens_BT` (one document per row, no dropout),
  (h_BTD, o_BTD): the attention's input (norm1 of the residual stream) and its heads' output
  before the output projection, so `mixer.o_proj(o) == mixer(h, None, pos)`."""
  b, t = tokens_BT.shape
  pos_BT = positions(None, b, t)
  x = teacher.embed(tokens_BT).astype(teacher.config.stream_dtype)
  for block in teacher.blocks:
    att, h = block.mixer, block.norm1(x)
    q, k, v = att._qkv(h, pos_BT)
    o = kernels.dot_product_attention(q, k, v, is_causal=True, window=None, scale=att.head_dim ** -0.5)
    yield h, o.reshape(b, t, -1)
    x, _, _ = block(x, None, pos_BT, None, None)   # the teacher's own block makes the next input


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _normed_heads(q, k, v, log_decay_H, *, impl, chunk_size):
  o, _ = gla(q, k, v, jnp.broadcast_to(log_decay_H, q.shape[:3]), scale=1.0, impl=impl, chunk_size=chunk_size)
  return group_norm(o.reshape(-1, o.shape[2] * o.shape[3]), o.shape[3], 1.0, 0.0, GROUP_NORM_EPS)


def dijiang_normed_heads(mixer: DiJiang, features, log_decay_H):
  """GroupNorm (no affine) of DiJiang's linear-attention output, float64 [B * T, H * p], from
  `features` = `mixer._features(h, pos)` and per-head log decays `log_decay_H` (not the mixer's).
  Jitted: one compilation serves every grid value and layer."""
  out = _normed_heads(*features, jnp.asarray(log_decay_H, jnp.float32), impl=mixer.impl,
                      chunk_size=mixer.chunk_size)
  return np.asarray(out, np.float64)


def head_r2(x_ND, y_ND, n_heads: int):
  """Per head (contiguous channel blocks): R^2 of y from a per-channel affine fit on x, i.e. the
  variance-weighted mean over the head's channels of corr(x_c, y_c)^2."""
  xc, yc = x_ND - x_ND.mean(0), y_ND - y_ND.mean(0)
  vx, vy = (xc * xc).mean(0), (yc * yc).mean(0)
  explained = np.where(vx > 0, (xc * yc).mean(0) ** 2 / np.maximum(vx, 1e-30), 0.0)   # vy corr^2
  return explained.reshape(n_heads, -1).sum(1) / np.maximum(vy.reshape(n_heads, -1).sum(1), 1e-30)


def _check_pair(student, teacher, tokens_BT, who: str):
  """-> tokens_BT as int32 numpy, after checking that `student` is the DiJiang conversion of a
  GPT-NeoX-style `teacher` of the same shape and the tokens are a [B, T] batch of its vocabulary."""
  for name, model in (("student", student), ("teacher", teacher)):
    if not isinstance(model, LM):
      raise TypeError(f"{who}: {name} must be an LM, got {type(model).__name__}")
  if set(student.config.layer_kinds) != {"dijiang"}:
    raise ValueError(f"{who}: student must be a DiJiang model (from convert_to_dijiang), got layer "
                     f"kinds {sorted(set(student.config.layer_kinds))}")
  _check_host(teacher.config, f"{who}: teacher")
  s, t = student.config, teacher.config
  shape = lambda c: (c.n_layers, c.d_model, c.n_heads, c.attn_head_dim, c.vocab_size)
  if shape(s) != shape(t):
    raise ValueError(f"{who}: student and teacher differ in (layers, d, heads, head dim, vocab): "
                     f"{shape(s)} vs {shape(t)}")
  return _check_tokens(tokens_BT, t.vocab_size, who)


def _check_tokens(tokens_BT, vocab_size: int, who: str):
  """-> tokens_BT as int32 numpy, after checking it is a non-empty [B, T] batch of the vocabulary."""
  tok = np.asarray(tokens_BT)
  if tok.ndim != 2 or tok.size == 0 or not np.issubdtype(tok.dtype, np.integer):
    raise ValueError(f"{who}: tokens_BT must be a non-empty [B, T] integer array, got "
                     f"shape {tok.shape} dtype {tok.dtype}")
  if tok.min() < 0 or tok.max() >= vocab_size:
    raise ValueError(f"{who}: tokens_BT has ids outside [0, {vocab_size})")
  return tok.astype(np.int32)


def _check_calibration(student, teacher, tokens_BT, grid, gate_preact):
  tok = _check_pair(student, teacher, tokens_BT, "calibrate_dijiang")
  if not student.config.dijiang_learn_decay:
    raise ValueError("calibrate_dijiang: student has fixed decays; convert with learn_decay=True")
  g = np.asarray(grid, np.float64)
  if g.ndim != 1 or g.size == 0 or not np.all(np.isfinite(g) & (g > 1)):
    raise ValueError(f"calibrate_dijiang: grid must be a non-empty sequence of time constants n > 1 "
                     f"(gamma = 1 - 1/n), got {grid!r}")
  if not math.isfinite(gate_preact) or gate_preact == 0:
    raise ValueError(f"calibrate_dijiang: gate_preact must be finite and non-zero, got {gate_preact}")
  return tok, g


def calibrate_dijiang(student: LM, teacher: LM, tokens_BT, *, grid=DECAY_GRID,
                      gate_preact: float = 1.0) -> list[dict]:
  """Sets `student`'s new DiJiang parameters, in place, from one batch `tokens_BT` [B, T] of the
  softmax `teacher` it was converted from; returns per-layer diagnostics. Every other parameter
  is left as it is. Per layer, on the teacher's own mixer input h (ours, not in the official code):
  - decay (needs `learn_decay=True`): per head, gamma = 1 - 1/n with n in `grid` maximising the
    R^2 of a per-channel affine fit of the teacher's attention output (the o_proj input) from
    GroupNorm(DiJiang's output). Each n is tried on all heads at once, so where GroupNorm groups
    straddle heads (H does not divide p) a head's fit also sees its neighbour's channels.
    The default gammas (n 32..512) are far longer than a char-level teacher's attention span;
    this was the largest gain measured (+0.73 -> +0.46 nats).
  - gate: silu(h W_G) made the constant silu(gate_preact). h = scale * xhat + bias with
    sum(xhat) = 0 (LayerNorm), so W_G[i, :] = kappa / scale_i gives h W_G = kappa *
    sum(bias / scale) on every token. Kept as it is when |kappa| > MAX_GATE_KAPPA.
  - GroupNorm affine (with the constant gate): per channel, mean and std of silu(gate) * GroupNorm(o)
    matched to the teacher's attention output.
  """
  tokens, grid = _check_calibration(student, teacher, tokens_BT, grid, gate_preact)
  b, t = tokens.shape
  pos_BT = positions(None, b, t)
  info = []
  teacher_io = teacher_attention_io(teacher, jnp.asarray(tokens))
  for layer, (block, (h, o_t)) in enumerate(zip(student.blocks, teacher_io)):
    m = block.mixer
    ot = np.asarray(o_t, np.float64).reshape(b * t, -1)
    feats = m._features(h, pos_BT)
    r2 = np.stack([head_r2(dijiang_normed_heads(m, feats, jnp.full((m.h,), math.log1p(-1 / n), jnp.float32)),
                           ot, m.h) for n in grid])
    pick = np.argmax(r2, 0)
    n_H = grid[pick]
    m.decay_logit.set_value(jnp.asarray(np.log(n_H - 1), jnp.float32))   # logit(1 - 1/n) = log(n - 1)
    rec = {"layer": layer, "decay_n": n_H.tolist(), "r2": r2[pick, np.arange(m.h)].round(4).tolist()}

    norm, kappa = block.norm1, math.inf   # the trick needs LayerNorm's mean removal and its bias
    if isinstance(norm, LayerNorm):
      scale, bias = (np.asarray(x[...], np.float64) for x in (norm.scale, norm.bias))
      s = float(np.sum(bias / scale)) if np.min(np.abs(scale)) > 1e-3 else 0.0
      kappa = gate_preact / s if s else math.inf
    rec["gate_kappa"] = kappa if math.isfinite(kappa) else None
    if abs(kappa) > MAX_GATE_KAPPA:
      rec["gate_constant"] = None    # a random gate: no per-channel constant to match against
      info.append(rec)
      continue
    kernel = np.broadcast_to((kappa / scale)[:, None], m.gate.kernel.get_value().shape)
    m.gate.kernel.set_value(jnp.asarray(kernel, m.gate.kernel.get_value().dtype))
    c = float(jax.nn.silu(gate_preact))
    gn = dijiang_normed_heads(m, feats, m._log_decay())
    a = ot.std(0) / np.maximum(gn.std(0), 1e-6)
    m.norm_scale.set_value(jnp.asarray(a / c, jnp.float32))
    m.norm_bias.set_value(jnp.asarray((ot.mean(0) - a * gn.mean(0)) / c, jnp.float32))
    rec["gate_constant"] = c
    info.append(rec)
  return info


# ------------------------------------------------------------------ attention transfer

# What `transfer_attention` may train, per DiJiang mixer (the DCT projection and quantiles are
# fixed buffers): everything by default.
MIXER_PARAMS = ("qkv", "decay_logit", "norm_scale", "norm_bias", "gate", "dense")


def _teacher_targets_fn(teacher: LM):
  """A jitted tokens_BT -> (h_LBTD, y_LBTD): per layer of `teacher`, its attention input and the
  attention block's output `o_proj(o)` (what the student mixer replaces)."""
  graphdef, state = nnx.split(teacher)

  @jax.jit
  def targets(state, tokens_BT):
    model = nnx.merge(graphdef, state)
    io = [(h, block.mixer.o_proj(o)) for block, (h, o) in zip(model.blocks, teacher_attention_io(model, tokens_BT))]
    return tuple(jnp.stack(x) for x in zip(*io))

  return lambda tokens_BT: targets(state, jnp.asarray(tokens_BT, jnp.int32))


def _split_mixers(student: LM, train):
  """Per layer (graphdef, trained params, everything else) of the student's mixers."""
  which = nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(n) for n in train)))
  return [nnx.split(block.mixer, which, ...) for block in student.blocks]


def _layer_nmse_L(graphdefs, train_L, rest_L, h_LBTD, y_LBTD):
  """Per layer: the mixer's mean squared error against the teacher's attention output, divided by
  that output's variance (1 - R^2), so layers of different output scales weigh alike."""
  b, t = h_LBTD.shape[1:3]
  pos_BT = positions(None, b, t)
  out = []
  for l, graphdef in enumerate(graphdefs):
    mixer = nnx.merge(graphdef, train_L[l], rest_L[l])
    y = mixer(h_LBTD[l], None, pos_BT).astype(jnp.float32)
    target = y_LBTD[l].astype(jnp.float32)
    out.append(jnp.mean(jnp.square(y - target)) / jnp.maximum(jnp.var(target), 1e-12))
  return jnp.stack(out)


def attention_transfer_error(student: LM, teacher: LM, tokens_BT) -> list[float]:
  """Per layer, on `tokens_BT`: the student mixer's normalised MSE (1 - R^2) against the teacher's
  attention block output, each given the teacher's own layer input (what `transfer_attention`
  minimises)."""
  tokens = _check_pair(student, teacher, tokens_BT, "attention_transfer_error")
  h, y = _teacher_targets_fn(teacher)(tokens)
  graphdefs, params_L, rest_L = zip(*_split_mixers(student, MIXER_PARAMS))
  return np.asarray(_layer_nmse_L(graphdefs, params_L, rest_L, h, y), np.float64).tolist()


def _check_transfer(student, steps, lr, train):
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"transfer_attention: steps must be a positive int, got {steps!r}")
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ValueError(f"transfer_attention: lr must be a finite positive number, got {lr!r}")
  names = [n for n in MIXER_PARAMS if n != "decay_logit" or student.config.dijiang_learn_decay]
  if isinstance(train, str) or not train or not set(train) <= set(names):
    raise ValueError(f"transfer_attention: train must be a non-empty subset of {names}, got {train!r}")


def transfer_attention(student: LM, teacher: LM, next_tokens, steps: int, *, lr: float = 3e-3,
                       train=MIXER_PARAMS) -> list[dict]:
  """Attention transfer (as LoLCATs' first stage; ours for DiJiang): trains the `train` parameters
  of every DiJiang mixer of `student`, in place, so that each reproduces its teacher layer's
  attention block output given the teacher's own input to that layer. All layers learn in
  parallel from one teacher forward per batch: loss = sum over layers of MSE / Var(target), Adam
  at `lr` decayed by a cosine to 0 over `steps` batches, `next_tokens(step)` -> tokens [B, T]
  (training data). One step costs about one forward + backward of the model: count it as a
  fine-tuning step. -> per layer {"layer", "nmse_first", "nmse_last"}: the loss terms on the
  first and the last batch, before their updates."""
  tokens = _check_pair(student, teacher, next_tokens(0), "transfer_attention")
  _check_transfer(student, steps, lr, train)
  targets = _teacher_targets_fn(teacher)
  graphdefs, params_L, rest_L = zip(*_split_mixers(student, train))
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss(params_L, rest_L, h_LBTD, y_LBTD):
    nmse_L = _layer_nmse_L(graphdefs, params_L, rest_L, h_LBTD, y_LBTD)
    return nmse_L.sum(), nmse_L

  @jax.jit
  def step(params_L, opt_state, rest_L, h_LBTD, y_LBTD):
    (_, nmse_L), grads = jax.value_and_grad(loss, has_aux=True)(params_L, rest_L, h_LBTD, y_LBTD)
    updates, opt_state = opt.update(grads, opt_state, params_L)
    return optax.apply_updates(params_L, updates), opt_state, nmse_L

  opt_state, first = opt.init(params_L), None
  for s in range(steps):
    if s:   # the models were checked with the first batch
      tokens = _check_tokens(next_tokens(s), teacher.config.vocab_size, "transfer_attention")
    params_L, opt_state, nmse_L = step(params_L, opt_state, rest_L, *targets(tokens))
    first = nmse_L if first is None else first
  for block, params in zip(student.blocks, params_L):
    nnx.update(block.mixer, params)
  return [{"layer": l, "nmse_first": round(float(a), 4), "nmse_last": round(float(b), 4)}
          for l, (a, b) in enumerate(zip(np.asarray(first), np.asarray(nmse_L)))]
