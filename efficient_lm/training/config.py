"""The run config: which model, which data, how to optimise, how long, on which mesh.

`RunConfig` nests `DataConfig`, `OptimConfig`, `TrainConfig` and `MeshConfig`; the model is a
preset name plus field overrides of `efficient_lm.configs.ModelConfig`. A config comes from a
built-in run (`RUNS`), a model preset name (the default run with that model), or a JSON file
(e.g. a run's own `config.json`), then `key=value` overrides:

  model=deltanet-tiny  model.d_model=128  data.seq_len=256  optim.lr=1e-3  train.steps=500
  mesh.fsdp=4  mesh.data=2
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any

from efficient_lm.data.pipeline import DataConfig
from efficient_lm.sharding import MeshConfig
from efficient_lm.training.optim import OptimConfig


class ConfigError(ValueError):
  """A bad run config: unknown key, bad value, unknown preset."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300
  batch_size: int = 32            # global batch (sequences per optimizer step)
  grad_accum: int = 1             # micro-batches per step (batch_size must be divisible)
  compute_dtype: str = "auto"     # auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16
  z_loss: float = 0.0
  seed: int = 0                   # parameter init
  log_every: int = 10
  eval_every: int = 100           # 0: only at the end
  eval_batches: int = 8           # 0: the whole held-out split
  checkpoint_every: int = 100     # 0: only at the end (and on SIGTERM/SIGINT)
  keep_checkpoints: int = 3
  keep_best: int = 1
  async_checkpoint: bool = True
  tensorboard: bool = True
  progress: str = "auto"          # auto (on a terminal) | on | off


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: str = "deltanet-tiny"
  model_overrides: dict = dataclasses.field(default_factory=dict)
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def model_config(self, **extra):
    from efficient_lm.configs import get_config
    try:
      return get_config(self.model, **{**self.model_overrides, **extra})
    except ValueError as e:
      raise ConfigError(f"model config: {e}") from None


def shared_data_dir() -> str:
  """`ELM_DATA_DIR`, else `../shared/data` next to the repository or the working directory."""
  if os.environ.get("ELM_DATA_DIR"):
    return os.environ["ELM_DATA_DIR"]
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for base in (here, os.getcwd()):
    cand = os.path.normpath(os.path.join(base, "..", "shared", "data"))
    if os.path.isdir(cand):
      return cand
  return os.path.normpath(os.path.join(here, "..", "shared", "data"))


def _runs() -> dict[str, RunConfig]:
  data_dir = shared_data_dir()
  shakespeare = os.path.join(data_dir, "tinyshakespeare.txt")
  return {
      # Bare `elm train`: MQAR on a 2-core CPU in a few minutes, prints the recall accuracy.
      "mqar": RunConfig(
          model="deltanet-tiny",
          # The scan form at T=32: with the chunked form, XLA's CPU runtime in jax 0.10.2 at
          # times deadlocks in this 1-device process (idle, never returns), even with the
          # scheduler flag pallas_kernels sets; the 8-device test processes have not shown it.
          model_overrides={"impl": "scan"},
          data=DataConfig(source="mqar", seq_len=32, mqar_vocab_size=128, mqar_num_kv_pairs=4,
                          mqar_eval_examples=512),
          optim=OptimConfig(lr=1e-2, warmup_steps=30, weight_decay=0.1),
          train=TrainConfig(steps=800, batch_size=64, eval_every=400, eval_batches=8,
                            checkpoint_every=400, log_every=20)),
      # experiments.md 2: character level, first 90% train, last 10% validation.
      "shakespeare-char": RunConfig(
          model="deltanet-tiny",
          data=DataConfig(source="text", path=shakespeare, tokenizer="chars", seq_len=128),
          optim=OptimConfig(lr=3e-3, warmup_steps=30),
          train=TrainConfig(steps=300, batch_size=16, eval_every=100, eval_batches=8)),
      "shakespeare-bytes": RunConfig(
          model="deltanet-tiny",
          data=DataConfig(source="text", path=shakespeare, tokenizer="bytes", seq_len=128),
          optim=OptimConfig(lr=3e-3, warmup_steps=30),
          train=TrainConfig(steps=300, batch_size=16, eval_every=100, eval_batches=8)),
      # experiments.md 3: train on the valid split, evaluate on the test split.
      "wikitext2": RunConfig(
          model="deltanet-tiny",
          data=DataConfig(source="wikitext", path=os.path.join(data_dir, "wikitext2.valid.txt"),
                          eval_path=os.path.join(data_dir, "wikitext2.test.txt"),
                          tokenizer=os.path.join(data_dir, "gpt-neox-20b.tokenizer.json"),
                          seq_len=256),
          optim=OptimConfig(lr=1e-3, warmup_steps=50),
          train=TrainConfig(steps=500, batch_size=16)),
  }


DEFAULT_RUN = "mqar"


def list_runs() -> list[str]:
  return sorted(_runs())


def get_run(name: str) -> RunConfig:
  runs = _runs()
  if name in runs:
    return runs[name]
  if name.endswith(".json") or os.path.isfile(name):
    return from_file(name)
  try:
    from efficient_lm.configs import list_presets
    presets = list_presets()
  except ImportError:
    presets = []
  if name in presets:
    return dataclasses.replace(runs[DEFAULT_RUN], model=name)
  raise ConfigError(f"unknown config {name!r}: not a run ({sorted(runs)}), a model preset "
                   f"({presets}) or a JSON file")


def from_dict(d: dict) -> RunConfig:
  known = {f.name for f in dataclasses.fields(RunConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ConfigError(f"config: unknown sections {unknown}; valid: {sorted(known)}")
  kw: dict[str, Any] = {}
  for f in dataclasses.fields(RunConfig):
    if f.name not in d:
      continue
    sub = _SECTIONS.get(f.name)
    if sub is None:
      kw[f.name] = d[f.name]
    else:
      fields = {g.name for g in dataclasses.fields(sub)}
      bad = sorted(set(d[f.name]) - fields)
      if bad:
        raise ConfigError(f"config: unknown keys {[f'{f.name}.{b}' for b in bad]}; "
                         f"valid: {sorted(f'{f.name}.{x}' for x in fields)}")
      kw[f.name] = sub(**d[f.name])
  cfg = RunConfig(**kw)
  if cfg.model_overrides:
    cfg = dataclasses.replace(cfg, model_overrides={
        k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model_overrides.items()})
  return cfg


def from_file(path: str) -> RunConfig:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  with open(path, encoding="utf-8") as f:
    return from_dict(json.load(f))


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "mesh": MeshConfig}


def _model_fields() -> dict[str, Any]:
  try:
    from efficient_lm.configs import ModelConfig
  except ImportError:
    return {}
  hints = typing.get_type_hints(ModelConfig)
  return {f.name: hints.get(f.name, str) for f in dataclasses.fields(ModelConfig)}


def valid_keys() -> list[str]:
  keys = ["model"] + [f"model.{k}" for k in _model_fields()]
  for name, sub in _SECTIONS.items():
    keys += [f"{name}.{f.name}" for f in dataclasses.fields(sub)]
  return keys


def _parse_value(key: str, raw: str, typ) -> Any:
  origin = typing.get_origin(typ)
  args = [a for a in typing.get_args(typ) if a is not type(None)]
  if raw.lower() in ("none", "null") and type(None) in typing.get_args(typ):
    return None
  if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
    typ, origin = args[0], typing.get_origin(args[0])
  try:
    if typ is bool:
      low = raw.lower()
      if low in ("1", "true", "yes", "on"):
        return True
      if low in ("0", "false", "no", "off"):
        return False
      raise ValueError
    if typ is int:
      return int(raw)
    if typ is float:
      return float(raw)
    if origin is tuple:
      return tuple(p.strip() for p in raw.split(",") if p.strip())
    return raw
  except ValueError:
    raise ConfigError(f"--set {key}={raw}: expected a value of type "
                     f"{getattr(typ, '__name__', typ)}") from None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
  """`["train.steps=50", "model.d_model=128", ...]` -> a new config; unknown keys and bad values
  raise ValueError listing the valid keys."""
  model_fields = _model_fields()
  sections = {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTIONS}
  model, model_over = cfg.model, dict(cfg.model_overrides)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key == "model":
      model = raw
      continue
    head, _, field = key.partition(".")
    if head == "model" and field in model_fields:
      model_over[field] = _parse_value(key, raw, model_fields[field])
    elif head in _SECTIONS and field in sections[head]:
      typ = typing.get_type_hints(_SECTIONS[head])[field]
      sections[head][field] = _parse_value(key, raw, typ)
    else:
      raise ConfigError(f"unknown config key {key!r}. Valid keys:\n  " +
                       "\n  ".join(valid_keys()))
  return RunConfig(model=model, model_overrides=model_over,
                   **{name: sub(**sections[name]) for name, sub in _SECTIONS.items()})
