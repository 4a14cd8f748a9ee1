"""The shared name-mapping helper: fill a model's parameters from a flat dict of named tensors.

A loader is a list of `Rule`s, one per parameter of OUR model: its path in `nnx.state(model)`,
the external tensor names it reads, and a function from those tensors (numpy, the checkpoint's
layout) to our layout. `fill_model` then
- builds the model abstractly (`nnx.eval_shape`, nothing allocated twice);
- raises `CheckpointMismatch` listing every missing tensor (named by a rule, absent from the
  checkpoint) and every unknown tensor (present, named by no rule, not matched by `ignore`);
- checks every converted shape against the model, listing all mismatches at once;
- casts each tensor to the parameter's dtype in the model: `param_dtype` for most, float32 for
  the parameters the model keeps in float32 whatever `param_dtype` is.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_lm.configs import ModelConfig
from efficient_lm.models import LM

Path = tuple


class CheckpointMismatch(ValueError):
  """Tensors missing from, unknown to, or of the wrong shape for the target model."""


def _identity(x):
  return x


def linear_t(w):
  """torch Linear weight [out, in] -> our kernel [in, out]."""
  return np.swapaxes(w, -1, -2)


def conv_t(w):
  """torch depthwise Conv1d weight [C, 1, K] -> our [K, C]."""
  return np.transpose(w[:, 0, :])


@dataclasses.dataclass(frozen=True)
class Rule:
  target: Path                       # path in nnx.state(model), e.g. ("blocks", 0, "mixer", "fc", "kernel")
  sources: tuple[str, ...]           # external tensor names read
  fn: Callable = _identity           # (*arrays) -> array in our layout


def rule(target: Sequence, *sources: str, fn: Callable = _identity) -> Rule:
  return Rule(tuple(target), tuple(sources), fn)


def path_name(path: Path) -> str:
  return ".".join(str(p) for p in path)


def checkpoint_dtype(tensors: dict[str, np.ndarray]) -> str:
  """The most common floating dtype of a checkpoint, as a config dtype name."""
  names = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float32", np.dtype(np.float16): "float16",
           np.dtype(jnp.bfloat16): "bfloat16"}
  counts = Counter(names[t.dtype] for t in tensors.values() if t.dtype in names)
  return counts.most_common(1)[0][0] if counts else "float32"


def _fmt(names: Iterable[str], limit: int = 200) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_names(expected: set[str], present: set[str], ignore: Sequence[str] = (), source: str = "checkpoint"):
  """Raises CheckpointMismatch listing missing and unknown tensor names."""
  missing = expected - present
  patterns = [re.compile(p) for p in ignore]
  unknown = {n for n in present - expected if not any(p.search(n) for p in patterns)}
  if missing or unknown:
    parts = []
    if missing:
      parts.append(f"missing tensors ({len(missing)}): {_fmt(missing)}")
    if unknown:
      parts.append(f"unknown tensors ({len(unknown)}): {_fmt(unknown)}")
    raise CheckpointMismatch(f"{source}: " + "; ".join(parts))


def fill_model(cfg: ModelConfig, rules: Sequence[Rule], tensors: dict[str, np.ndarray], *,
               ignore: Sequence[str] = (), source: str = "checkpoint") -> LM:
  """The model of `cfg` with every variable set through `rules` from `tensors` (see module doc)."""
  abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  by_path = {tuple(p): v for p, v in flat}
  targets = {r.target for r in rules}
  if len(targets) != len(rules) or targets != set(by_path):
    dup = [path_name(t) for t, c in Counter(r.target for r in rules).items() if c > 1]
    raise RuntimeError(  # a loader bug, not a checkpoint problem
        f"{source} mapping does not cover the model: unfilled {_fmt(map(path_name, set(by_path) - targets))}; "
        f"not in the model {_fmt(map(path_name, targets - set(by_path)))}; duplicated {dup}")
  check_names({s for r in rules for s in r.sources}, set(tensors), ignore, source)
  values, bad = {}, []
  for r in rules:
    var = by_path[r.target]
    want = var.get_value()
    out = np.asarray(r.fn(*(tensors[s] for s in r.sources)))
    if tuple(out.shape) != tuple(want.shape):
      bad.append(f"{'+'.join(r.sources)} -> {path_name(r.target)}: got {tuple(out.shape)}, want {tuple(want.shape)}")
      continue
    values[r.target] = out.astype(want.dtype)
  if bad:
    raise CheckpointMismatch(f"{source}: shape mismatches ({len(bad)}): " + "; ".join(bad))
  for path, var in flat:
    var.set_value(jnp.asarray(values[tuple(path)]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
