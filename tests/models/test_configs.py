"""Presets, validation, parameter counts without allocation, sharding names, weight-decay mask."""
import dataclasses

import jax
import numpy as np
import jax.numpy as jnp
import pytest
from flax import nnx

import efficient_lm
from efficient_lm.configs import PRESETS, ModelConfig

KINDS = ("transformer", "rodimus", "rodimus_plus", "deltanet", "gated_deltanet", "gla", "dijiang",
         "linear_attention")
PAPER = {  # name: (low, high) parameter counts
    "rodimus-wt103": (30e6, 45e6), "rodimus_plus-1.6b": (1.55e9, 1.65e9), "deltanet-340m": (0.33e9, 0.40e9),
    "deltanet-1.3b": (1.3e9, 1.45e9), "gated_deltanet-1.3b": (1.3e9, 1.45e9), "rmoe-paper": (0.85e9, 0.95e9)}
LOGICAL = {"vocab", "embed", "heads", "kv", "mlp", "experts", "state", "conv", None}


def test_required_presets_exist():
  names = set(efficient_lm.list_presets())
  assert {f"{k}-tiny" for k in KINDS} | {"rmoe-tiny", "smoe-tiny"} | set(PAPER) <= names


@pytest.mark.parametrize("name", [n for n in PRESETS if n.endswith("-tiny")])
def test_tiny_presets_are_cpu_sized(name):
  assert efficient_lm.count_params(name) < 2_000_000
  assert PRESETS[name].vocab_size == 256


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_parameter_counts_without_allocation(name):
  abstract = efficient_lm.abstract_model(name)
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)   # nothing was allocated
  low, high = PAPER[name]
  assert low < sum(x.size for x in leaves) < high


def test_count_matches_hand_formula():
  d, f, v, n = 64, 256, 256, 2   # f = 256 * ceil(int(8d/3) / 256)   # transformer-tiny: 4 d^2 attention + 3 d f SwiGLU + 2 norms per layer
  expected = v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d + d * v
  assert efficient_lm.count_params("transformer-tiny") == expected
  cfg = PRESETS["rodimus_plus-1.6b"]
  assert cfg.mlp_hidden_size == 2736 and cfg.d_inner == 4096 and cfg.window == 2048
  assert PRESETS["deltanet-340m"].mlp_hidden_size == 2816
  assert PRESETS["gated_deltanet-1.3b"].mlp_hidden_size == 5632


@pytest.mark.parametrize("overrides, field", [
    (dict(n_heads=5), "n_heads"),
    (dict(kind="mamba"), "kind"),
    (dict(kind="rodimus_plus", window=0), "window"),
    (dict(layer_pattern=("deltanet", "swa"), window=-3), "window"),
    (dict(layer_pattern=("deltanet", "lstm")), "layer_pattern"),
    (dict(layer_pattern=("deltanet",)), "layer_pattern"),
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(n_experts=4, router="hash"), "router"),
    (dict(impl="triton"), "impl"),
    (dict(dtype="int8"), "dtype"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(feature_map="softmax"), "feature_map"),
    (dict(conv_init="xavier"), "conv_init"),
    (dict(no_such_field=1), "no_such_field"),
])
def test_invalid_configs_raise_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    efficient_lm.create_model("transformer-tiny", **overrides)


def test_unknown_preset_raises():
  with pytest.raises(ValueError, match="unknown preset"):
    efficient_lm.create_model("gpt-5")


def test_overrides_apply_to_config_objects():
  cfg = dataclasses.replace(PRESETS["deltanet-tiny"], n_layers=1)
  assert efficient_lm.get_config(cfg, d_model=32).d_model == 32
  assert isinstance(efficient_lm.get_config("gla-tiny"), ModelConfig)


@pytest.mark.parametrize("name", ["rodimus_plus-tiny", "gated_deltanet-tiny", "rmoe-tiny", "dijiang-tiny", "gla-tiny"])
def test_parameters_carry_logical_axis_names(name):
  state = nnx.state(efficient_lm.abstract_model(name), nnx.Param)
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == len(var.shape), path
    assert set(axes) <= LOGICAL, (path, axes)


def _flat(mask):
  name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return {name(p).removesuffix("/value"): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}


def test_weight_decay_mask():
  model = efficient_lm.abstract_model("gated_deltanet-tiny")
  mask = efficient_lm.weight_decay_mask(nnx.state(model, nnx.Param))
  flat = _flat(mask)
  by_suffix = lambda s: [m for k, m in flat.items() if k.endswith(s)]
  assert by_suffix("embedding") == [False]
  assert all(m is False for m in by_suffix("scale"))
  assert all(m is False for m in by_suffix("A_log") + by_suffix("dt_bias"))
  assert all(by_suffix("q_proj/kernel")) and all(by_suffix("down/kernel")) and all(by_suffix("lm_head"))
  rodimus = efficient_lm.weight_decay_mask(nnx.state(efficient_lm.abstract_model("rodimus-tiny"), nnx.Param))
  flat = _flat(rodimus)
  assert not any(m for k, m in flat.items() if k.endswith(("w_res", "gate_bias", "bias")))
  assert all(m for k, m in flat.items() if k.endswith("out_proj/kernel"))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = efficient_lm.create_model("deltanet-tiny", dtype="bfloat16", n_layers=1)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits = nnx.jit(lambda m, t: m(t))(model, jnp.zeros((1, 8), jnp.int32))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_short_conv_defaults_follow_fla_and_the_field_overrides_them():
  count = lambda name, **kw: efficient_lm.count_params(name, **kw)
  gla = PRESETS["gla-tiny"]
  key_dim, value_dim = int(gla.d_model * gla.expand_k), int(gla.d_model * gla.expand_v)
  per_layer = gla.conv_size * (2 * key_dim + value_dim)   # depthwise q, k, v convs, no bias
  assert count("gla_conv-tiny") - count("gla-tiny") == gla.n_layers * per_layer
  assert count("gla-tiny", use_short_conv=True) == count("gla_conv-tiny")
  assert count("deltanet-tiny", use_short_conv=False) < count("deltanet-tiny")   # DeltaNet: on by default
  assert PRESETS["deltanet-tiny"].short_conv(True) and not PRESETS["gla-tiny"].short_conv(False)


@pytest.mark.parametrize("preset", ["deltanet-tiny", "gla_conv-tiny"])
def test_conv_init_picks_the_qkv_conv_weights_distribution(preset):
  """"normal": FLA's N(0, init_std); "torch": PyTorch Conv1d's U(+-1/sqrt(conv_size))."""
  for conv_init, std, bound in (("normal", 0.02, None), ("torch", 0.5 / 3 ** 0.5, 0.5)):
    model = efficient_lm.create_model(preset, conv_init=conv_init, conv_size=4)
    mixer = model.blocks[0].mixer
    weights = np.concatenate([np.asarray(c.weight[...]).ravel() for c in mixer.convs])
    assert abs(weights.std() / std - 1) < 0.15, (conv_init, weights.std())
    if bound is not None:
      assert np.abs(weights).max() <= bound

