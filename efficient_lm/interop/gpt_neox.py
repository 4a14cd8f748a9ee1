"""GPT-NeoX / Pythia checkpoints (Hugging Face `GPTNeoXForCausalLM`) into the Transformer block
with the GPT-NeoX options: LayerNorm with bias, parallel residual, partial rotary, GELU MLP,
biases on attention and MLP, untied head.

Names read (per layer i), with torch Linear weights [out, in]:
    gpt_neox.embed_in.weight [V, d]                   -> embed.embedding
    gpt_neox.layers.i.input_layernorm.{weight,bias}   -> blocks.i.norm1.{scale,bias}
    gpt_neox.layers.i.post_attention_layernorm.*      -> blocks.i.norm2.*
    gpt_neox.layers.i.attention.query_key_value.{weight [3d, d], bias}
        rows laid out per head as [H, 3, p] (q, k, v of head h are contiguous)
                                                      -> blocks.i.mixer.{q,k,v}_proj.{kernel,bias}
    gpt_neox.layers.i.attention.dense.*               -> blocks.i.mixer.o_proj.*
    gpt_neox.layers.i.mlp.dense_h_to_4h.*             -> blocks.i.mlp.up.*
    gpt_neox.layers.i.mlp.dense_4h_to_h.*             -> blocks.i.mlp.down.*
    gpt_neox.final_layer_norm.*                       -> norm_f.*
    embed_out.weight (transformers < 5 and the Hub) or lm_head.weight [V, d] -> lm_head [d, V]
Ignored buffers of old checkpoints: attention.bias / attention.masked_bias (causal masks),
rotary_emb.inv_freq.
Config: hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, layer_norm_eps,
use_parallel_residual, hidden_act ("gelu" exact; "gelu_new", "gelu_pytorch_tanh", "gelu_fast" tanh),
attention_bias (default true), tie_word_embeddings, and the rotary fraction/base as either
`rope_parameters.{partial_rotary_factor, rope_theta}` (transformers 5) or `rotary_pct`,
`rotary_emb_base` / `rope_theta` (older).
"""
from __future__ import annotations

import numpy as np

from efficient_lm.configs import ModelConfig, get_config
from efficient_lm.interop.io import read_checkpoint
from efficient_lm.interop.mapping import checkpoint_dtype, fill_model, linear_t, rule

IGNORE = (r"\.attention\.bias$", r"\.attention\.masked_bias$", r"rotary_emb\.inv_freq$")
GELU = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def gpt_neox_config(hf: dict, **overrides) -> ModelConfig:
  """Our config for a GPT-NeoX `config.json` dict (unsupported settings raise ValueError)."""
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  if (rope.get("rope_type", "default") != "default") or (scaling and scaling.get("rope_type", scaling.get("type"))
                                                          not in (None, "default")):
    raise ValueError(f"config.json: rope scaling {rope or scaling} is not supported")
  act = hf.get("hidden_act", "gelu")
  if act not in GELU:
    raise ValueError(f"config.json: hidden_act {act!r} is not supported; expected one of {sorted(GELU)}")
  fraction = rope.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 1.0)))
  base = rope.get("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0)))
  fields = dict(
      kind="transformer", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"], mlp_hidden=hf["intermediate_size"],
      norm="layer", norm_eps=hf.get("layer_norm_eps", 1e-5), residual_dtype="compute",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_base=float(base),
      rope_fraction=float(fraction), parallel_residual=bool(hf.get("use_parallel_residual", True)),
      attn_bias=bool(hf.get("attention_bias", True)), mlp_kind=GELU[act])
  return get_config(ModelConfig(**fields), **overrides)


def gpt_neox_rules(cfg: ModelConfig):
  h, p, d = cfg.n_heads, cfg.attn_head_dim, cfg.d_model

  def qkv(j):   # pick q (0), k (1) or v (2) from the [H, 3, p] fused rows
    return (lambda w: w.reshape(h, 3, p, d)[:, j].reshape(h * p, d).T,
            lambda b: b.reshape(h, 3, p)[:, j].reshape(h * p))

  rules = [rule(("embed", "embedding"), "gpt_neox.embed_in.weight"),
           rule(("norm_f", "scale"), "gpt_neox.final_layer_norm.weight"),
           rule(("norm_f", "bias"), "gpt_neox.final_layer_norm.bias")]
  for i in range(cfg.n_layers):
    src, dst = f"gpt_neox.layers.{i}.", ("blocks", i)
    for ours, theirs in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
      rules += [rule(dst + (ours, "scale"), src + theirs + ".weight"),
                rule(dst + (ours, "bias"), src + theirs + ".bias")]
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
      wf, bf = qkv(j)
      rules.append(rule(dst + ("mixer", name, "kernel"), src + "attention.query_key_value.weight", fn=wf))
      if cfg.attn_bias:
        rules.append(rule(dst + ("mixer", name, "bias"), src + "attention.query_key_value.bias", fn=bf))
    rules.append(rule(dst + ("mixer", "o_proj", "kernel"), src + "attention.dense.weight", fn=linear_t))
    if cfg.attn_bias:
      rules.append(rule(dst + ("mixer", "o_proj", "bias"), src + "attention.dense.bias"))
    for ours, theirs in (("up", "dense_h_to_4h"), ("down", "dense_4h_to_h")):
      rules += [rule(dst + ("mlp", ours, "kernel"), src + f"mlp.{theirs}.weight", fn=linear_t),
                rule(dst + ("mlp", ours, "bias"), src + f"mlp.{theirs}.bias")]
  return rules


def gpt_neox_from_state_dict(hf_config: dict, tensors: dict[str, np.ndarray], *, param_dtype: str | None = None,
                             **overrides):
  """Our LM from a GPT-NeoX config dict and state dict. `param_dtype=None` keeps the checkpoint's
  dtype; a dtype name casts to it. `overrides` are config fields (e.g. `dtype` for compute, `impl`)."""
  tensors = dict(tensors)
  head = "embed_out.weight" if "embed_out.weight" in tensors else "lm_head.weight"
  cfg = gpt_neox_config(hf_config, param_dtype=param_dtype or checkpoint_dtype(tensors), **overrides)
  rules = gpt_neox_rules(cfg)
  ignore = IGNORE
  if cfg.tie_embeddings:
    ignore = IGNORE + (r"^(embed_out|lm_head)\.weight$",)
  else:
    rules.append(rule(("lm_head",), head, fn=linear_t))
  return fill_model(cfg, rules, tensors, ignore=ignore, source="GPT-NeoX checkpoint")


def load_gpt_neox(directory, *, param_dtype: str | None = None, **overrides):
  """Loads a local GPT-NeoX / Pythia directory (`config.json` + `*.safetensors`, or
  `pytorch_model*.bin` with torch installed) into our Transformer with the GPT-NeoX options."""
  hf_config, tensors = read_checkpoint(directory)
  return gpt_neox_from_state_dict(hf_config, tensors, param_dtype=param_dtype, **overrides)
