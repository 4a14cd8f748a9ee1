"""Our own models to safetensors and back (exact), the safetensors reader/writer, and
convert_to_dijiang on a GPT-NeoX-style host built here (no torch needed)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_lm
from efficient_lm import convert_to_dijiang, load_safetensors, save_safetensors
from efficient_lm.interop import CheckpointMismatch, model_tensors, read_safetensors, write_safetensors
from efficient_lm.layers.core import Buffer

TOKS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 11)))
NEOX = dict(norm="layer", norm_eps=1e-5, parallel_residual=True, attn_bias=True, mlp_kind="gelu",
            rope_fraction=0.25)


def test_safetensors_format_round_trip(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b.c": np.ones((0, 4), np.int32),
             "bf": np.array([1.5, -2.0], dtype=jnp.bfloat16), "s": np.float16(3.0).reshape(())}
  write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
  raw = (tmp_path / "x.safetensors").read_bytes()
  n = int.from_bytes(raw[:8], "little")
  assert n % 8 == 0 and json.loads(raw[8:8 + n])["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
  back, meta = read_safetensors(tmp_path / "x.safetensors")
  assert meta == {"k": "v"} and set(back) == set(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("name,overrides", [
    ("dijiang-tiny", {}),                                   # fixed buffers (DCT, quantiles) travel too
    ("rodimus_plus-tiny", {"param_dtype": "bfloat16"}),     # bf16 parameters, float32 w_res / gate bias
    ("gated_deltanet-tiny", {}),
    ("rmoe-tiny", {}),
])
def test_export_round_trip_is_exact(tmp_path, name, overrides):
  model = efficient_lm.create_model(name, seed=3, **overrides)
  save_safetensors(model, tmp_path)
  back = load_safetensors(tmp_path)
  assert back.config == model.config
  a, b = model_tensors(model), model_tensors(back)
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_array_equal(np.asarray(model(TOKS)), np.asarray(back(TOKS)))


def test_export_load_checks_names_and_casts(tmp_path):
  model = efficient_lm.create_model("transformer-tiny")
  save_safetensors(model, tmp_path)
  cast = load_safetensors(tmp_path, param_dtype="bfloat16")
  assert cast.blocks[0].mixer.q_proj.kernel[...].dtype == jnp.bfloat16
  tensors, _ = read_safetensors(tmp_path / "model.safetensors")
  tensors = dict(tensors)
  del tensors["blocks.1.mlp.up.kernel"]
  tensors["blocks.9.extra"] = np.zeros(1, np.float32)
  write_safetensors(tmp_path / "model.safetensors", tensors)
  with pytest.raises(CheckpointMismatch, match=r"missing tensors \(1\): blocks.1.mlp.up.kernel.*"
                                               r"unknown tensors \(1\): blocks.9.extra"):
    load_safetensors(tmp_path)


def test_neox_options_default_off_keep_the_tree():
  """The GPT-NeoX options add parameters only when switched on."""
  plain = nnx.state(efficient_lm.abstract_model("transformer-tiny"), nnx.Param)
  neox = nnx.state(efficient_lm.abstract_model("transformer-tiny", **NEOX), nnx.Param)
  names = lambda s: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(s)}
  assert all(not n.endswith(".bias") for n in names(plain))
  assert {"blocks.0.mixer.q_proj.bias", "blocks.0.mixer.o_proj.bias", "blocks.0.mlp.up.bias",
          "blocks.0.norm1.bias"} <= names(neox)


def test_neox_host_decode_matches_forward():
  """Parallel residual, biases, partial rotary and the GELU MLP on the cached decode path too."""
  model = efficient_lm.create_model("transformer-tiny", seed=2, **NEOX)
  full = model(TOKS)
  logits, cache = model.prefill(TOKS[:, :-1], max_len=16)
  step, _ = model.decode(TOKS[:, -1:], cache)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :-1]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, -1]), rtol=1e-4, atol=1e-4)


def test_convert_to_dijiang_keeps_weights_and_adds_parameters():
  host = efficient_lm.create_model("transformer-tiny", seed=5, **NEOX)
  dj = convert_to_dijiang(host, seed=1)
  cfg, d, h, p = dj.config, 64, 4, 16
  assert cfg.kind == "dijiang" and cfg.mlp_hidden_size == host.config.mlp_hidden_size and cfg.rope_fraction == 0.25
  for new, old in zip(dj.blocks, host.blocks):
    qkv = np.asarray(new.mixer.qkv.kernel[...]).reshape(d, h, 3, p)
    bias = np.asarray(new.mixer.qkv.bias[...]).reshape(h, 3, p)
    for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
      np.testing.assert_array_equal(qkv[:, :, j].reshape(d, h * p), getattr(old.mixer, n).kernel[...])
      np.testing.assert_array_equal(bias[:, j].reshape(h * p), getattr(old.mixer, n).bias[...])
    np.testing.assert_array_equal(new.mixer.dense.kernel[...], old.mixer.o_proj.kernel[...])
    np.testing.assert_array_equal(new.mixer.dense.bias[...], old.mixer.o_proj.bias[...])
    np.testing.assert_array_equal(new.mlp.down.kernel[...], old.mlp.down.kernel[...])
    np.testing.assert_array_equal(new.norm2.bias[...], old.norm2.bias[...])
    # The new parameters: W_G, the GroupNorm affine, the fixed projection.
    assert new.mixer.gate.kernel[...].shape == (d, d) and float(jnp.std(new.mixer.gate.kernel[...])) > 0
    np.testing.assert_array_equal(new.mixer.norm_scale[...], np.ones(d))
    np.testing.assert_array_equal(new.mixer.norm_bias[...], np.zeros(d))
    assert isinstance(new.mixer.dct, Buffer) and new.mixer.w[...].shape == (p,)
  np.testing.assert_array_equal(dj.lm_head[...], host.lm_head[...])
  np.testing.assert_array_equal(dj.embed.embedding[...], host.embed.embedding[...])
  np.testing.assert_array_equal(dj.norm_f.bias[...], host.norm_f.bias[...])
  n_new = efficient_lm.count_params(cfg) - efficient_lm.count_params(host.config)
  assert n_new == host.config.n_layers * (d * d + 2 * d)   # W_G and the GroupNorm affine per layer
  assert np.isfinite(np.asarray(dj(TOKS))).all()
  learned = convert_to_dijiang(host, learn_decay=True)
  assert learned.blocks[0].mixer.decay_logit[...].shape == (h,)


def test_convert_to_dijiang_rejects_other_hosts():
  with pytest.raises(ValueError, match="SwiGLU"):
    convert_to_dijiang(efficient_lm.create_model("transformer-tiny", parallel_residual=True))
  with pytest.raises(ValueError, match="layer kinds"):
    convert_to_dijiang(efficient_lm.create_model("deltanet-tiny"))
  without_bias = efficient_lm.create_model("transformer-tiny", **{**NEOX, "attn_bias": False})
  dj = convert_to_dijiang(without_bias)   # biases the host lacks become zeros
  np.testing.assert_array_equal(dj.blocks[0].mixer.qkv.bias[...], np.zeros(3 * 64))
  assert jax.tree.leaves(nnx.state(dj, Buffer))
