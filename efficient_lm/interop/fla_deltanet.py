"""flash-linear-attention `DeltaNetForCausalLM` checkpoints (Hugging Face format) into our
DeltaNet model.

Names read (fla's `fla/models/delta_net/modeling_delta_net.py` and `fla/layers/delta_net.py`),
torch Linear weights [out, in], ShortConvolution (an nn.Conv1d) weights [C, 1, K]:
    model.embeddings.weight [V, d]                 -> embed.embedding
    model.layers.i.attn_norm.weight [d]            -> blocks.i.norm1.scale
    model.layers.i.attn.q_proj.weight [H*K, d]     -> blocks.i.mixer.q_proj.kernel   (k_proj alike)
    model.layers.i.attn.v_proj.weight [H*V, d]     -> blocks.i.mixer.v_proj.kernel
    model.layers.i.attn.b_proj.weight [H, d]       -> blocks.i.mixer.b_proj.kernel
    model.layers.i.attn.{q,k,v}_conv1d.weight [C, 1, K] -> blocks.i.mixer.convs.{0,1,2}.weight [K, C]
    model.layers.i.attn.g_proj.weight [H*V, d]     -> blocks.i.mixer.g_proj.kernel   (use_gate only)
    model.layers.i.attn.o_norm.weight [V]          -> blocks.i.mixer.o_norm.scale    (one, shared by heads)
    model.layers.i.attn.o_proj.weight [d, H*V]     -> blocks.i.mixer.o_proj.kernel
    model.layers.i.mlp_norm.weight                 -> blocks.i.norm2.scale
    model.layers.i.mlp.{gate,up,down}_proj.weight  -> blocks.i.mlp.{gate,up,down}.kernel
    model.norm.weight                              -> norm_f.scale
    lm_head.weight [V, d]                          -> lm_head [d, V]  (absent when tied)
Config (`DeltaNetConfig`): hidden_size, num_heads, expand_k (key width d * expand_k), expand_v
(value width d * expand_v), use_gate, use_short_conv, conv_size, norm_eps, num_hidden_layers,
vocab_size, tie_word_embeddings, intermediate_size or hidden_ratio (fla's GatedMLP rule
`256 * ceil(int(d * ratio * 2/3) / 256)`), allow_neg_eigval (if present). Required: use_beta,
qk_norm "l2", qk_activation "silu", hidden_act "swish"/"silu", no conv bias, no `attn` hybrid layers
(fla's hybrid softmax-attention layers are not mapped yet), no `attnres_block_size` (fla 0.6's
attention residuals, extra `*_res_proj` / `*_res_norm` tensors, are not mapped).
Checked against the flash-linear-attention 0.6.0 wheel's sources. `use_output_norm` is accepted and
ignored, as fla's layer ignores it (it always applies o_norm).
"""
from __future__ import annotations

import math

import numpy as np

from efficient_lm.configs import ModelConfig, get_config
from efficient_lm.interop.io import read_checkpoint
from efficient_lm.interop.mapping import checkpoint_dtype, conv_t, fill_model, linear_t, rule

IGNORE = ()


def _require(hf: dict, key: str, allowed, default):
  value = hf.get(key, default)
  if value not in allowed:
    raise ValueError(f"config.json: {key}={value!r} is not supported; expected one of {list(allowed)}")
  return value


def fla_mlp_hidden(d: int, hidden_ratio, intermediate_size) -> int:
  if intermediate_size is not None:
    return int(intermediate_size)
  ratio = 4 if hidden_ratio is None else hidden_ratio
  return 256 * math.ceil(int(d * ratio * 2 / 3) / 256)


def fla_deltanet_config(hf: dict, **overrides) -> ModelConfig:
  """Our config for an fla `DeltaNetConfig` dict (unsupported settings raise ValueError)."""
  if hf.get("attn"):
    raise ValueError("config.json: hybrid `attn` layers (fla softmax attention) are not supported yet")
  _require(hf, "use_beta", (True,), True)
  _require(hf, "qk_norm", ("l2",), "l2")
  _require(hf, "qk_activation", ("silu",), "silu")
  _require(hf, "hidden_act", ("swish", "silu"), "swish")
  _require(hf, "conv_bias", (False,), False)
  _require(hf, "attnres_block_size", (None,), None)   # fla 0.6's attention residuals: not mapped
  d, h = hf["hidden_size"], hf["num_heads"]
  key_dim, value_dim = int(d * hf.get("expand_k", 1.0)), int(d * hf.get("expand_v", 1.0))
  if key_dim % h or value_dim % h:
    raise ValueError(f"config.json: key/value widths {key_dim}/{value_dim} not divisible by num_heads={h}")
  kd, vd = key_dim // h, value_dim // h
  fields = dict(
      kind="deltanet", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h,
      head_dim=kd, expand_v=vd / kd, use_short_conv=bool(hf.get("use_short_conv", True)),
      conv_size=hf.get("conv_size", 4), use_output_gate=bool(hf.get("use_gate", False)),
      allow_neg_eigval=bool(hf.get("allow_neg_eigval", False)), norm="rms", norm_eps=hf.get("norm_eps", 1e-6),
      residual_dtype="compute", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      mlp_hidden=fla_mlp_hidden(d, hf.get("hidden_ratio", 4), hf.get("intermediate_size")))
  return get_config(ModelConfig(**fields), **overrides)


def fla_deltanet_rules(cfg: ModelConfig):
  rules = [rule(("embed", "embedding"), "model.embeddings.weight"),
           rule(("norm_f", "scale"), "model.norm.weight")]
  if not cfg.tie_embeddings:
    rules.append(rule(("lm_head",), "lm_head.weight", fn=linear_t))
  for i in range(cfg.n_layers):
    src, dst = f"model.layers.{i}.", ("blocks", i)
    rules += [rule(dst + ("norm1", "scale"), src + "attn_norm.weight"),
              rule(dst + ("norm2", "scale"), src + "mlp_norm.weight"),
              rule(dst + ("mixer", "o_norm", "scale"), src + "attn.o_norm.weight")]
    linears = ["q_proj", "k_proj", "v_proj", "b_proj", "o_proj"] + (["g_proj"] if cfg.use_output_gate else [])
    rules += [rule(dst + ("mixer", n, "kernel"), src + f"attn.{n}.weight", fn=linear_t) for n in linears]
    if cfg.short_conv(True):
      rules += [rule(dst + ("mixer", "convs", j, "weight"), src + f"attn.{n}_conv1d.weight", fn=conv_t)
                for j, n in enumerate("qkv")]
    rules += [rule(dst + ("mlp", ours, "kernel"), src + f"mlp.{ours}_proj.weight", fn=linear_t)
              for ours in ("gate", "up", "down")]
  return rules


def fla_deltanet_from_state_dict(hf_config: dict, tensors: dict[str, np.ndarray], *,
                                 param_dtype: str | None = None, **overrides):
  """Our LM from an fla DeltaNet config dict and state dict (`param_dtype=None` keeps the
  checkpoint's dtype; a name casts). With tied embeddings a stored `lm_head.weight` is ignored."""
  cfg = fla_deltanet_config(hf_config, param_dtype=param_dtype or checkpoint_dtype(tensors), **overrides)
  ignore = IGNORE + ((r"^lm_head\.weight$",) if cfg.tie_embeddings else ())
  return fill_model(cfg, fla_deltanet_rules(cfg), tensors, ignore=ignore, source="fla DeltaNet checkpoint")


def load_fla_deltanet(directory, *, param_dtype: str | None = None, **overrides):
  """Loads a local fla `DeltaNetForCausalLM` directory (`config.json` + weights)."""
  hf_config, tensors = read_checkpoint(directory)
  return fla_deltanet_from_state_dict(hf_config, tensors, param_dtype=param_dtype, **overrides)
