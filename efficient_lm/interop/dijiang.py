"""`convert_to_dijiang`: a loaded softmax model (the GPT-NeoX host) -> the DiJiang model of models.md.

Kept (copied exactly): embeddings, LM head, every LayerNorm, the MLP, and per layer the
attention's q/k/v projections (re-fused into DiJiang's `qkv` in GPT-NeoX's per-head `[H, 3, p]`
layout, so a Pythia model converts back to its own fused `query_key_value`) and its output
projection (`dense`). Biases the host lacks are zeros.
Added: `gate` (W_G, xavier uniform gain 2^-2.5), the GroupNorm affine (ones, zeros), the fixed
DCT projection and Gaussian quantiles (buffers, from `seed`), and with `learn_decay` the
per-head decay logits. Everything but the projection is then fine-tuned (models.md).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from efficient_lm.configs import get_config
from efficient_lm.models import LM


def _check_host(cfg):
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
    raise ValueError("convert_to_dijiang: the model is not a GPT-NeoX-style host: " + "; ".join(problems))


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
