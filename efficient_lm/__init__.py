"""efficient-lm: sub-quadratic language models in JAX / Flax NNX.

    model = efficient_lm.create_model("deltanet-tiny", impl="chunk")
    logits = model(tokens_BT, segment_ids)            # float32 [B, T, vocab]
    logits, aux = model(tokens_BT, segment_ids, return_aux=True)   # aux["moe_aux_loss"]
    out = efficient_lm.generate(model, prompt_BT, 32, temperature=0.8, top_p=0.9)
    efficient_lm.count_params("deltanet-1.3b")        # via eval_shape, nothing allocated
"""
from __future__ import annotations

import jax
from flax import nnx

from efficient_lm.configs import ModelConfig, get_config, list_presets
from efficient_lm.models import LM, generate, weight_decay_mask
from efficient_lm.interop import (convert_to_dijiang, load_fla_deltanet, load_gpt_neox, load_rodimus,
                                  load_safetensors, save_safetensors)


def create_model(name_or_config, *, seed: int = 0, **overrides) -> LM:
  """Builds a preset (or config) with `overrides` applied and validated."""
  return LM(get_config(name_or_config, **overrides), rngs=nnx.Rngs(seed))


def abstract_model(name_or_config, **overrides) -> LM:
  """The model with `jax.ShapeDtypeStruct` parameters (nnx.eval_shape): no allocation."""
  cfg = get_config(name_or_config, **overrides)
  return nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))


def count_params(name_or_config, **overrides) -> int:
  """Number of trainable parameters (`nnx.Param`), computed without allocating."""
  params = nnx.state(abstract_model(name_or_config, **overrides), nnx.Param)
  return sum(x.size for x in jax.tree.leaves(params))


__all__ = ["LM", "ModelConfig", "abstract_model", "count_params", "create_model", "generate", "get_config",
           "list_presets", "weight_decay_mask"]
__all__ += ["convert_to_dijiang", "load_fla_deltanet", "load_gpt_neox", "load_rodimus", "load_safetensors",
            "save_safetensors"]
