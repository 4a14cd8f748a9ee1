"""fla `DeltaNetForCausalLM` checkpoints: config and name/shape mapping against a synthetic state
dict in fla's naming, and logits against a float64 NumPy forward of fla's equations. (The check
against fla itself runs on a GPU: experiments/interop/check_fla_deltanet.py.)"""
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_lm.interop import CheckpointMismatch, fla_deltanet_config, fla_deltanet_from_state_dict
from tests.conftest import assert_rel_close
from tests.interop import reference as ref

D, VOCAB, HEADS = 32, 40, 2


def hf_config(**extra):
  cfg = {"model_type": "delta_net", "attn_mode": "chunk", "hidden_size": D, "expand_k": 0.5, "expand_v": 1,
         "use_gate": False, "use_short_conv": True, "conv_size": 4, "use_beta": True, "use_output_norm": True,
         "num_heads": HEADS, "qk_norm": "l2", "qk_activation": "silu", "hidden_ratio": 4, "intermediate_size": None,
         "hidden_act": "swish", "num_hidden_layers": 2, "norm_eps": 1e-6, "attn": None,
         "tie_word_embeddings": False, "fuse_norm": True, "fuse_swiglu": True, "vocab_size": VOCAB}
  cfg.update(extra)
  return cfg


def state_dict(use_gate=False, tied=False, seed=0):
  return ref.fla_deltanet_state_dict(np.random.default_rng(seed), d=D, n_layer=2, vocab=VOCAB, heads=HEADS,
                                     expand_k=0.5, expand_v=1, use_gate=use_gate, mlp_hidden=256, tied=tied)


def test_config_mapping():
  cfg = fla_deltanet_config(hf_config())
  assert (cfg.kind, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.expand_v) == ("deltanet", D, HEADS, 8, 2.0)
  assert cfg.mlp_hidden_size == 256 and cfg.norm_eps == 1e-6 and cfg.residual_dtype == "compute"
  assert fla_deltanet_config(hf_config(hidden_size=1024, num_heads=8, expand_k=1)).mlp_hidden_size == 2816
  assert fla_deltanet_config(hf_config(intermediate_size=96)).mlp_hidden_size == 96
  for bad in ({"qk_norm": "sum"}, {"qk_activation": "relu"}, {"use_beta": False},
              {"attn": {"layers": [1], "num_heads": 2}}, {"attnres_block_size": 4}):
    with pytest.raises(ValueError):
      fla_deltanet_config(hf_config(**bad))


def test_names_and_shapes():
  sd = state_dict(use_gate=True)
  model = fla_deltanet_from_state_dict(hf_config(use_gate=True), sd)
  m, p = model.blocks[1].mixer, "model.layers.1.attn."
  for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("b_proj", "b_proj"),
                       ("g_proj", "g_proj"), ("o_proj", "o_proj")):
    np.testing.assert_array_equal(getattr(m, ours).kernel[...], sd[p + theirs + ".weight"].T)
  for j, n in enumerate("qkv"):
    np.testing.assert_array_equal(m.convs[j].weight[...], sd[p + f"{n}_conv1d.weight"][:, 0].T)
  np.testing.assert_array_equal(m.o_norm.scale[...], sd[p + "o_norm.weight"])
  np.testing.assert_array_equal(model.blocks[1].mlp.gate.kernel[...], sd["model.layers.1.mlp.gate_proj.weight"].T)
  np.testing.assert_array_equal(model.blocks[1].norm2.scale[...], sd["model.layers.1.mlp_norm.weight"])
  np.testing.assert_array_equal(model.lm_head[...], sd["lm_head.weight"].T)
  np.testing.assert_array_equal(model.norm_f.scale[...], sd["model.norm.weight"])


def test_errors_list_every_missing_and_unknown_tensor():
  sd = state_dict()
  for name in ("model.layers.0.attn.k_conv1d.weight", "model.layers.1.mlp.up_proj.weight"):
    del sd[name]
  sd["model.layers.0.attn.q_conv1d.bias"] = np.zeros(16, np.float32)
  with pytest.raises(CheckpointMismatch) as e:
    fla_deltanet_from_state_dict(hf_config(), sd)
  msg = str(e.value)
  assert "missing tensors (2)" in msg and "unknown tensors (1)" in msg
  assert "k_conv1d" in msg and "mlp.up_proj" in msg and "q_conv1d.bias" in msg
  sd = state_dict(use_gate=True)   # a gated checkpoint read as ungated: g_proj unknown
  with pytest.raises(CheckpointMismatch, match=r"unknown tensors \(2\): model.layers.0.attn.g_proj.weight"):
    fla_deltanet_from_state_dict(hf_config(), sd)


@pytest.mark.parametrize("use_gate,tied", [(False, False), (True, True)])
def test_logits_match_numpy_float64(use_gate, tied):
  sd = state_dict(use_gate=use_gate, tied=tied)
  if tied:
    sd["lm_head.weight"] = sd["model.embeddings.weight"]   # a tied head saved anyway is ignored
  model = fla_deltanet_from_state_dict(hf_config(use_gate=use_gate, tie_word_embeddings=tied), sd)
  toks = np.random.default_rng(3).integers(0, VOCAB, (2, 23))
  want = ref.fla_deltanet_lm(sd, toks, n_layer=2, heads=HEADS, use_gate=use_gate, tied=tied)
  assert_rel_close("deltanet logits", want, model(jnp.asarray(toks)), 1e-5)
