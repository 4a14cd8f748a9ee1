"""Named presets: each family's defaults as its official code sets them, then tiny and paper sizes."""
from __future__ import annotations

import dataclasses

from efficient_lm.configs.base import ModelConfig, at_layers, every_other, validate

# Family defaults (models.md): norm eps, residual dtype, embeddings tying, init rescale.
TRANSFORMER = ModelConfig(kind="transformer", norm_eps=1e-6)
RODIMUS = ModelConfig(kind="rodimus", norm_eps=1e-5, residual_dtype="float32", tie_embeddings=True,
                      out_proj_rescale=1)
RODIMUS_PLUS = dataclasses.replace(RODIMUS, kind="rodimus_plus", out_proj_rescale=3)
DELTANET = ModelConfig(kind="deltanet", norm_eps=1e-6)
GATED_DELTANET = dataclasses.replace(DELTANET, kind="gated_deltanet", use_output_gate=True)
GLA = ModelConfig(kind="gla", norm_eps=1e-6, expand_k=0.5, expand_v=1.0)
LINEAR_ATTENTION = ModelConfig(kind="linear_attention", norm_eps=1e-6, expand_k=1.0, expand_v=1.0,
                               feature_map="elu")
DIJIANG = ModelConfig(kind="dijiang", norm="layer", norm_eps=1e-5, rope_fraction=0.25)

_TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, chunk_size=16)


def _tiny(base: ModelConfig, **kw) -> ModelConfig:
  return dataclasses.replace(base, **{**_TINY, **kw})


PRESETS: dict[str, ModelConfig] = {
    # CPU-sized (< 2M parameters, byte vocabulary).
    "transformer-tiny": _tiny(TRANSFORMER),
    "rodimus-tiny": _tiny(RODIMUS, mem_size=16),
    "rodimus_plus-tiny": _tiny(RODIMUS_PLUS, mem_size=16, window=8),
    "deltanet-tiny": _tiny(DELTANET),
    "gated_deltanet-tiny": _tiny(GATED_DELTANET, n_heads=2, head_dim=16, expand_v=2.0),
    "gla-tiny": _tiny(GLA),
    "gla_conv-tiny": _tiny(GLA, use_short_conv=True),
    "linear_attention-tiny": _tiny(LINEAR_ATTENTION),
    "dijiang-tiny": _tiny(DIJIANG),
    "smoe-tiny": _tiny(TRANSFORMER, n_experts=4, top_k=2, expert_hidden=64, router="linear"),
    "rmoe-tiny": _tiny(TRANSFORMER, n_layers=3, n_experts=4, top_k=2, expert_hidden=64,
                       router="recurrent", router_dim=32),
    "deltanet_swa-tiny": _tiny(DELTANET, window=8, layer_pattern=every_other(2, "deltanet", "swa")),
    "deltanet_attn-tiny": _tiny(DELTANET, n_layers=4,
                                layer_pattern=at_layers(4, "deltanet", "transformer", (2, 3))),
    # Paper sizes.
    "rodimus-wt103": dataclasses.replace(RODIMUS, vocab_size=50257, d_model=512, n_layers=6, mem_size=64),
    "rodimus_plus-1.6b": dataclasses.replace(RODIMUS_PLUS, vocab_size=126464, d_model=2048, n_layers=24,
                                             n_heads=16, window=4096 // 2, mem_size=64),
    "deltanet-340m": dataclasses.replace(DELTANET, vocab_size=32000, d_model=1024, n_layers=24, n_heads=8),
    "deltanet-1.3b": dataclasses.replace(DELTANET, vocab_size=32000, d_model=2048, n_layers=24, n_heads=16),
    "gated_deltanet-1.3b": dataclasses.replace(GATED_DELTANET, vocab_size=32000, d_model=2048, n_layers=21,
                                               n_heads=6, head_dim=256, expand_v=2.0),
    "deltanet_swa-340m": dataclasses.replace(DELTANET, vocab_size=32000, d_model=1024, n_layers=24, n_heads=8,
                                             window=2048, layer_pattern=every_other(24, "deltanet", "swa")),
    "deltanet_attn-340m": dataclasses.replace(DELTANET, vocab_size=32000, d_model=1024, n_layers=24, n_heads=8,
                                              layer_pattern=at_layers(24, "deltanet", "transformer", (2, 13))),
    "rmoe-paper": dataclasses.replace(TRANSFORMER, vocab_size=32000, d_model=1280, n_layers=24, n_heads=20,
                                      n_experts=16, top_k=4, expert_hidden=448, router="recurrent"),
}


def list_presets() -> list[str]:
  return sorted(PRESETS)


def get_config(name_or_config, **overrides) -> ModelConfig:
  """A preset by name (or a config), with `overrides` applied by dataclasses.replace, validated."""
  if isinstance(name_or_config, ModelConfig):
    cfg = name_or_config
  elif name_or_config in PRESETS:
    cfg = PRESETS[name_or_config]
  else:
    raise ValueError(f"name_or_config: unknown preset {name_or_config!r}; known: {list_presets()}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"overrides: unknown config fields {unknown}")
  return validate(dataclasses.replace(cfg, **overrides))
