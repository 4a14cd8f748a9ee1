"""Our own models to and from safetensors: every variable (parameters and fixed buffers such as
DiJiang's DCT projection) under its dotted nnx path (`blocks.0.mixer.q_proj.kernel`), in its own
dtype, plus `config.json` holding the `ModelConfig`. Loading back is exact.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from flax import nnx

from efficient_lm.configs import ModelConfig, get_config
from efficient_lm.interop.io import read_safetensors, write_safetensors
from efficient_lm.interop.mapping import fill_model, path_name, rule
from efficient_lm.models import LM

FORMAT = "efficient_lm"
WEIGHTS = "model.safetensors"


def model_tensors(model: LM) -> dict[str, np.ndarray]:
  """{dotted path: numpy array} of every variable of the model."""
  return {path_name(tuple(p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def config_to_dict(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_dict(fields: dict, **overrides) -> ModelConfig:
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.json: unknown config fields {unknown}")
  fields = dict(fields)
  if "layer_pattern" in fields:
    fields["layer_pattern"] = tuple(fields["layer_pattern"])
  return get_config(ModelConfig(**fields), **overrides)


def save_safetensors(model: LM, directory) -> pathlib.Path:
  """Writes `directory/model.safetensors` and `directory/config.json`; returns the directory."""
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  write_safetensors(d / WEIGHTS, model_tensors(model), metadata={"format": FORMAT})
  (d / "config.json").write_text(json.dumps({"format": FORMAT, "config": config_to_dict(model.config)}, indent=1))
  return d


def load_safetensors(directory, *, param_dtype: str | None = None, **overrides) -> LM:
  """The model saved by `save_safetensors` (exactly; `param_dtype` casts, `overrides` are
  config fields such as `impl`)."""
  d = pathlib.Path(directory)
  meta = json.loads((d / "config.json").read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{d}/config.json: not an {FORMAT} export (format={meta.get('format')!r})")
  tensors, _ = read_safetensors(d / WEIGHTS)
  fields = dict(meta["config"])
  if param_dtype is not None:
    fields["param_dtype"] = param_dtype
  cfg = config_from_dict(fields, **overrides)
  abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  rules = [rule(tuple(p), path_name(tuple(p))) for p, _ in nnx.to_flat_state(nnx.state(abstract))]
  return fill_model(cfg, rules, tensors, source=f"{d}/{WEIGHTS}")

