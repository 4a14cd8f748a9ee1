"""Official Rodimus / Rodimus+ checkpoints (codefuse-ai/rodimus, `RodimusForCausalLM`) into our
Rodimus models.

Names read (per layer i; torch Linear weights [out, in], Conv1d [C, 1, K]); d_inner = di, m = mem_size:
    model.embeddings.weight [V, d]                          -> embed.embedding
    model.layers.i.mixer_norm.weight [d]                    -> blocks.i.norm1.scale
    model.layers.i.mixer.fc.weight [2 di, d]  (x first, z second)    -> blocks.i.mixer.fc.kernel
    model.layers.i.mixer.inner_mixer.short_conv.conv1d.weight [di, 1, K] -> blocks.i.mixer.conv.weight [K, di]
    model.layers.i.mixer.inner_mixer.short_conv.conv1d.bias [di]    -> blocks.i.mixer.conv.bias
    model.layers.i.mixer.inner_mixer.in_proj.weight [2m, di] (q first)  -> blocks.i.mixer.in_proj.kernel
    model.layers.i.mixer.inner_mixer.ch_gate_proj.0.weight [r, di]   -> blocks.i.mixer.low.kernel
    model.layers.i.mixer.inner_mixer.ch_gate_proj.1.{weight [di, r], bias} -> blocks.i.mixer.up.{kernel,bias}
    model.layers.i.mixer.inner_mixer.mem_gate_proj.weight [2m, di] (select first, tau second)
                                                            -> blocks.i.mixer.gate.kernel
    model.layers.i.mixer.inner_mixer.mem_gate_proj.bias [2m] -> blocks.i.mixer.gate_bias
    model.layers.i.mixer.inner_mixer.residual_weight [di]   -> blocks.i.mixer.w_res
    model.layers.i.mixer.act_norm.weight [di]               -> blocks.i.mixer.norm.scale
    model.layers.i.mixer.out_proj.weight [d, di]            -> blocks.i.mixer.out_proj.kernel
  Rodimus+ only:
    model.layers.i.attn_norm.weight                         -> blocks.i.norm2.scale
    model.layers.i.attn.{q,k,v}_proj.weight                 -> blocks.i.attn.{q,k,v}_proj.kernel
    model.layers.i.attn.out_proj.weight                     -> blocks.i.attn.o_proj.kernel
    model.layers.i.ffn_norm.weight                          -> blocks.i.norm3.scale
    model.layers.i.ffn.fc.weight [2f, d]: first half x (-> up), second half gate
                                                            -> blocks.i.mlp.{up,gate}.kernel
    model.layers.i.ffn.out_proj.weight                      -> blocks.i.mlp.down.kernel
    model.norm_f.weight                                     -> norm_f.scale
    lm_head.weight [V, d]                                   -> lm_head [d, V]  (absent or ignored when tied)
Ignored: inference-cache buffers registered by `allocate_inference_cache` (conv_state_*,
ssm_state_*, key_cache_*, value_cache_*) and rotary buffers.
Config (`RodimusConfig`): block_type, d_model, n_layer, vocab_size, norm_epsilon,
residual_in_fp32, tie_word_embeddings, mixer_cfg {mem_size, d_conv, expand_ratio (must be 2),
input_gate_low_rank ("auto" or max(d // 64, 16)), normalize_epsilon (default 1e-12)}, attn_cfg
{num_heads (default d // 128), num_heads_k (must be 1), num_heads_v (must be num_heads),
window_size W (our window w = W // 2), rotary_emb_dim (-1 or the head dim), rotary_emb_base,
ffn_expand_ratio (default 4/3)}. use_scale_embedding / use_norm_embedding must be false.
"""
from __future__ import annotations

import numpy as np

from efficient_lm.configs import ModelConfig, get_config
from efficient_lm.configs.base import round_up
from efficient_lm.interop.io import read_checkpoint
from efficient_lm.interop.mapping import checkpoint_dtype, conv_t, fill_model, linear_t, rule

IGNORE = (r"\.(conv_state|ssm_state|key_cache|value_cache)_\d+$", r"rotary_emb\.")


def _auto(value):
  if isinstance(value, str) and value != "auto":
    return float(value) if "." in value or "e" in value else int(value)
  return value


def rodimus_config(hf: dict, **overrides) -> ModelConfig:
  """Our config for an official `RodimusConfig` dict (unsupported settings raise ValueError)."""
  kind = hf.get("block_type", "rodimus")
  if kind not in ("rodimus", "rodimus_plus"):
    raise ValueError(f"config.json: block_type {kind!r}; expected 'rodimus' or 'rodimus_plus'")
  for flag in ("use_scale_embedding", "use_norm_embedding"):
    if hf.get(flag, False):
      raise ValueError(f"config.json: {flag}=true is not supported")
  d = hf["d_model"]
  mixer, attn = dict(hf.get("mixer_cfg") or {}), dict(hf.get("attn_cfg") or {})
  if float(_auto(mixer.get("expand_ratio", 2))) != 2.0:
    raise ValueError(f"config.json: mixer_cfg.expand_ratio={mixer['expand_ratio']} (only 2 is supported)")
  rank = _auto(mixer.get("input_gate_low_rank", "auto"))
  if rank != "auto" and int(rank) != max(d // 64, 16):
    raise ValueError(f"config.json: mixer_cfg.input_gate_low_rank={rank} (only 'auto' = {max(d // 64, 16)})")
  if mixer.get("normalize_epsilon") is not None:
    k_eps = float(mixer["normalize_epsilon"])
  else:
    k_eps = 1e-12
  fields = dict(kind=kind, vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
                mem_size=int(mixer.get("mem_size", 64)), conv_size=int(mixer.get("d_conv", 4)),
                rodimus_k_eps=k_eps, norm="rms", norm_eps=float(hf.get("norm_epsilon", 1e-5)),
                residual_dtype="float32" if hf.get("residual_in_fp32", True) else "compute",
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                out_proj_rescale=1 if kind == "rodimus" else 3, n_heads=1)
  if kind == "rodimus_plus":
    heads = attn.get("num_heads") or d // 128
    if attn.get("num_heads_k", 1) != 1 or attn.get("num_heads_v", heads) != heads:
      raise ValueError(f"config.json: attn_cfg heads {attn}: only num_heads_k=1, num_heads_v=num_heads")
    head_dim = d // heads
    if attn.get("rotary_emb_dim", -1) not in (-1, head_dim):
      raise ValueError(f"config.json: attn_cfg.rotary_emb_dim={attn['rotary_emb_dim']} (only the full head dim)")
    for key, ok in (("rotary_emb_scale_base", None), ("rotary_emb_interleaved", False), ("softmax_scale", None)):
      if attn.get(key, ok) != ok:
        raise ValueError(f"config.json: attn_cfg.{key}={attn[key]!r} is not supported")
    window = attn.get("window_size")
    if not window or window <= 0 or window // 2 < 1:
      raise ValueError(f"config.json: attn_cfg.window_size={window!r}: global attention is not supported")
    ratio = float(_auto(attn.get("ffn_expand_ratio", 4 / 3)))
    fields.update(n_heads=heads, window=window // 2, rope_base=float(attn.get("rotary_emb_base", 10000.0)),
                  mlp_hidden=round_up(int(d * ratio), 8))
  return get_config(ModelConfig(**fields), **overrides)


def rodimus_rules(cfg: ModelConfig):
  rules = [rule(("embed", "embedding"), "model.embeddings.weight"),
           rule(("norm_f", "scale"), "model.norm_f.weight")]
  if not cfg.tie_embeddings:
    rules.append(rule(("lm_head",), "lm_head.weight", fn=linear_t))
  for i in range(cfg.n_layers):
    src, dst = f"model.layers.{i}.", ("blocks", i)
    mx, inner = dst + ("mixer",), src + "mixer.inner_mixer."
    rules += [
        rule(dst + ("norm1", "scale"), src + "mixer_norm.weight"),
        rule(mx + ("fc", "kernel"), src + "mixer.fc.weight", fn=linear_t),
        rule(mx + ("conv", "weight"), inner + "short_conv.conv1d.weight", fn=conv_t),
        rule(mx + ("conv", "bias"), inner + "short_conv.conv1d.bias"),
        rule(mx + ("in_proj", "kernel"), inner + "in_proj.weight", fn=linear_t),
        rule(mx + ("low", "kernel"), inner + "ch_gate_proj.0.weight", fn=linear_t),
        rule(mx + ("up", "kernel"), inner + "ch_gate_proj.1.weight", fn=linear_t),
        rule(mx + ("up", "bias"), inner + "ch_gate_proj.1.bias"),
        rule(mx + ("gate", "kernel"), inner + "mem_gate_proj.weight", fn=linear_t),
        rule(mx + ("gate_bias",), inner + "mem_gate_proj.bias"),
        rule(mx + ("w_res",), inner + "residual_weight"),
        rule(mx + ("norm", "scale"), src + "mixer.act_norm.weight"),
        rule(mx + ("out_proj", "kernel"), src + "mixer.out_proj.weight", fn=linear_t)]
    if cfg.kind == "rodimus_plus":
      half = lambda j: (lambda w: np.split(w, 2, axis=0)[j].T)
      rules += [
          rule(dst + ("norm2", "scale"), src + "attn_norm.weight"),
          rule(dst + ("norm3", "scale"), src + "ffn_norm.weight"),
          *[rule(dst + ("attn", f"{n}_proj", "kernel"), src + f"attn.{n}_proj.weight", fn=linear_t) for n in "qkv"],
          rule(dst + ("attn", "o_proj", "kernel"), src + "attn.out_proj.weight", fn=linear_t),
          rule(dst + ("mlp", "up", "kernel"), src + "ffn.fc.weight", fn=half(0)),
          rule(dst + ("mlp", "gate", "kernel"), src + "ffn.fc.weight", fn=half(1)),
          rule(dst + ("mlp", "down", "kernel"), src + "ffn.out_proj.weight", fn=linear_t)]
  return rules


def rodimus_from_state_dict(hf_config: dict, tensors: dict[str, np.ndarray], *, param_dtype: str | None = None,
                            **overrides):
  """Our LM from an official Rodimus config dict and state dict (`param_dtype=None` keeps the
  checkpoint's dtype; a name casts; `w_res`, `gate_bias` stay float32 as in the official code)."""
  cfg = rodimus_config(hf_config, param_dtype=param_dtype or checkpoint_dtype(tensors), **overrides)
  ignore = IGNORE + ((r"^lm_head\.weight$",) if cfg.tie_embeddings else ())
  return fill_model(cfg, rodimus_rules(cfg), tensors, ignore=ignore, source="Rodimus checkpoint")


def load_rodimus(directory, *, param_dtype: str | None = None, **overrides):
  """Loads a local official Rodimus / Rodimus+ directory (`config.json` + weights)."""
  hf_config, tensors = read_checkpoint(directory)
  return rodimus_from_state_dict(hf_config, tensors, param_dtype=param_dtype, **overrides)
