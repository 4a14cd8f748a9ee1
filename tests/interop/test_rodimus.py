"""Official Rodimus / Rodimus+ checkpoints: name/shape mapping from the official layout, and
numerical parity against an independent float64 NumPy forward of the official equations."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from efficient_lm.interop import (CheckpointMismatch, load_rodimus, rodimus_config, rodimus_from_state_dict,
                                  write_safetensors)
from efficient_lm.interop.mapping import path_name
from tests.conftest import assert_rel_close
from tests.interop import reference as ref

D, VOCAB, MEM, HEADS, W = 32, 50, 8, 2, 8


def hf_config(block_type, tied=True, n_layer=2, **extra):
  cfg = {"block_type": block_type, "d_model": D, "n_layer": n_layer, "vocab_size": VOCAB, "norm_epsilon": 1e-5,
         "residual_in_fp32": True, "tie_word_embeddings": tied,
         "mixer_cfg": {"mem_size": MEM, "input_gate_low_rank": "auto", "mode": "fused_chunk"}, "attn_cfg": {}}
  if block_type == "rodimus_plus":
    cfg["attn_cfg"] = {"num_heads": HEADS, "num_heads_k": 1, "num_heads_v": HEADS, "window_size": W}
  cfg.update(extra)
  return cfg


def state_dict(block_type, tied=True, n_layer=2, seed=0):
  return ref.rodimus_state_dict(np.random.default_rng(seed), block_type=block_type, d=D, n_layer=n_layer,
                                vocab=VOCAB, mem=MEM, heads=HEADS, tied=tied)


def test_config_mapping():
  cfg = rodimus_config(hf_config("rodimus_plus", tied=False))
  assert (cfg.kind, cfg.d_model, cfg.n_layers, cfg.mem_size, cfg.n_heads, cfg.window) == (
      "rodimus_plus", D, 2, MEM, HEADS, W // 2)
  assert cfg.d_inner == 64 and cfg.low_rank == 16 and cfg.mlp_hidden_size == 48
  assert cfg.residual_dtype == "float32" and not cfg.tie_embeddings and cfg.norm_eps == 1e-5
  coder = rodimus_config(hf_config("rodimus", mixer_cfg={"mem_size": MEM, "normalize_epsilon": 1e-5}))
  assert coder.rodimus_k_eps == 1e-5
  for bad in ({"use_scale_embedding": True}, {"mixer_cfg": {"expand_ratio": 3}},
              {"attn_cfg": {"num_heads": HEADS, "num_heads_k": 2, "window_size": W}}):
    with pytest.raises(ValueError):
      rodimus_config(hf_config("rodimus_plus", **bad))


@pytest.mark.parametrize("block_type", ["rodimus", "rodimus_plus"])
def test_names_and_shapes(block_type):
  sd = state_dict(block_type, tied=False)
  model = rodimus_from_state_dict(hf_config(block_type, tied=False), sd)
  mixer = model.blocks[1].mixer
  p = "model.layers.1.mixer."
  np.testing.assert_array_equal(mixer.fc.kernel[...], sd[p + "fc.weight"].T)
  np.testing.assert_array_equal(mixer.conv.weight[...], sd[p + "inner_mixer.short_conv.conv1d.weight"][:, 0].T)
  np.testing.assert_array_equal(mixer.gate_bias[...], sd[p + "inner_mixer.mem_gate_proj.bias"])
  np.testing.assert_array_equal(mixer.w_res[...], sd[p + "inner_mixer.residual_weight"])
  np.testing.assert_array_equal(mixer.low.kernel[...], sd[p + "inner_mixer.ch_gate_proj.0.weight"].T)
  np.testing.assert_array_equal(model.lm_head[...], sd["lm_head.weight"].T)
  if block_type == "rodimus_plus":
    blk, fc = model.blocks[0], sd["model.layers.0.ffn.fc.weight"]
    np.testing.assert_array_equal(blk.mlp.up.kernel[...], fc[:fc.shape[0] // 2].T)    # x: first half
    np.testing.assert_array_equal(blk.mlp.gate.kernel[...], fc[fc.shape[0] // 2:].T)  # gate: second half
    np.testing.assert_array_equal(blk.attn.k_proj.kernel[...], sd["model.layers.0.attn.k_proj.weight"].T)
    np.testing.assert_array_equal(blk.norm3.scale[...], sd["model.layers.0.ffn_norm.weight"])


def test_missing_unknown_and_shape_errors():
  sd = state_dict("rodimus_plus")
  broken = dict(sd)
  del broken["model.layers.1.ffn.out_proj.weight"]
  broken["model.layers.0.attn.rogue.weight"] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointMismatch) as e:
    rodimus_from_state_dict(hf_config("rodimus_plus"), broken)
  assert "model.layers.1.ffn.out_proj.weight" in str(e.value) and "model.layers.0.attn.rogue.weight" in str(e.value)
  wrong = dict(sd, **{"model.layers.0.mixer.inner_mixer.in_proj.weight": np.zeros((3, 64), np.float32)})
  with pytest.raises(CheckpointMismatch, match="in_proj"):
    rodimus_from_state_dict(hf_config("rodimus_plus"), wrong)
  # Inference-cache buffers of the official code are ignored; a tied head stored anyway is too.
  extra = dict(sd, **{"model.layers.0.mixer.inner_mixer.conv_state_0": np.zeros((1, 64, 4), np.float32),
                      "lm_head.weight": sd["model.embeddings.weight"]})
  rodimus_from_state_dict(hf_config("rodimus_plus"), extra)


def test_one_mixer_matches_numpy_float64():
  sd = state_dict("rodimus")
  model = rodimus_from_state_dict(hf_config("rodimus"), sd)
  h = np.random.default_rng(1).standard_normal((2, 19, D)).astype(np.float32)
  out = model.blocks[0].mixer(jnp.asarray(h), None, None)
  want = ref.rodimus_mixer(sd, "model.layers.0.mixer.", h.astype(np.float64), mem=MEM)
  assert_rel_close("rodimus mixer", want, out, 1e-5)


@pytest.mark.parametrize("block_type,tied", [("rodimus", True), ("rodimus_plus", False)])
def test_lm_logits_match_numpy_float64(block_type, tied):
  sd = state_dict(block_type, tied=tied)
  model = rodimus_from_state_dict(hf_config(block_type, tied=tied), sd)
  toks = np.random.default_rng(2).integers(0, VOCAB, (2, 21))
  want = ref.rodimus_lm(sd, toks, block_type=block_type, n_layer=2, mem=MEM, heads=HEADS, window_size=W, tied=tied)
  assert_rel_close(f"{block_type} logits", want, model(jnp.asarray(toks)), 1e-5)


def test_directory_dtype_kept_or_cast(tmp_path):
  sd = {k: v.astype(jnp.bfloat16) if not k.endswith(("residual_weight", "mem_gate_proj.bias")) else v
        for k, v in state_dict("rodimus").items()}
  write_safetensors(tmp_path / "model.safetensors", sd)
  (tmp_path / "config.json").write_text(json.dumps(hf_config("rodimus")))
  kept = load_rodimus(tmp_path)
  assert kept.config.param_dtype == "bfloat16"
  assert kept.blocks[0].mixer.fc.kernel[...].dtype == jnp.bfloat16
  assert kept.blocks[0].mixer.w_res[...].dtype == jnp.float32       # float32 in the official code too
  np.testing.assert_array_equal(np.asarray(kept.embed.embedding[...]), sd["model.embeddings.weight"])
  cast = load_rodimus(tmp_path, param_dtype="float32")
  assert cast.blocks[0].mixer.fc.kernel[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(cast.blocks[0].mixer.fc.kernel[...]),
                                sd["model.layers.0.mixer.fc.weight"].astype(np.float32).T)
  assert path_name(("blocks", 0, "mixer")) == "blocks.0.mixer"
