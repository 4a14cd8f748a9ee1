"""GPT-NeoX / Pythia: a tiny random `transformers.GPTNeoXForCausalLM` built here (no download),
saved with save_pretrained, loaded into our Transformer with the GPT-NeoX options; float32 logits
match. Also the pytorch_model.bin path, dtype handling, and convert_to_dijiang on the result."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from efficient_lm import convert_to_dijiang, load_gpt_neox  # noqa: E402
from efficient_lm.interop import CheckpointMismatch, read_safetensors  # noqa: E402
from tests.conftest import assert_rel_close  # noqa: E402

VOCAB = 96


def make_neox(tmp_path, *, seed=0, safe=True, dtype=torch.float32, **kw):
  torch.manual_seed(seed)
  args = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
              rotary_pct=0.25, max_position_embeddings=128, hidden_act="gelu", use_parallel_residual=True)
  args.update(kw)
  model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**args)).eval()
  with torch.no_grad():   # move every parameter off its init (LayerNorm ones / zero biases included)
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  model = model.to(dtype)
  if safe:
    model.save_pretrained(tmp_path)
  else:   # transformers 5 writes safetensors only: the classic torch.save of the state dict
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  return model


def hf_logits(model, toks):
  with torch.no_grad():
    return model(torch.as_tensor(toks)).logits.float().numpy()


TOKS = np.random.default_rng(0).integers(0, VOCAB, (2, 33))


@pytest.mark.parametrize("kw", [{}, {"use_parallel_residual": False, "hidden_act": "gelu_new", "rotary_pct": 0.5}])
def test_safetensors_logits_match(tmp_path, kw):
  hf = make_neox(tmp_path, **kw)
  assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
  ours = load_gpt_neox(tmp_path)
  cfg = ours.config
  assert cfg.norm == "layer" and cfg.attn_bias and cfg.parallel_residual == hf.config.use_parallel_residual
  assert cfg.rope_fraction == kw.get("rotary_pct", 0.25) and cfg.param_dtype == "float32"
  assert_rel_close("gpt-neox logits", hf_logits(hf, TOKS), ours(jnp.asarray(TOKS)), 1e-4)


def test_pytorch_bin_logits_match(tmp_path):
  hf = make_neox(tmp_path, seed=1, safe=False)   # head named lm_head.weight here, embed_out.weight above
  assert list(tmp_path.glob("pytorch_model*.bin")) and not list(tmp_path.glob("*.safetensors"))
  assert_rel_close("gpt-neox .bin logits", hf_logits(hf, TOKS), load_gpt_neox(tmp_path)(jnp.asarray(TOKS)), 1e-4)


def test_dtype_kept_or_cast(tmp_path):
  make_neox(tmp_path, seed=2, dtype=torch.bfloat16)
  kept = load_gpt_neox(tmp_path)
  assert kept.config.param_dtype == "bfloat16"
  assert kept.blocks[0].mixer.q_proj.kernel[...].dtype == jnp.bfloat16
  cast = load_gpt_neox(tmp_path, param_dtype="float32")
  assert cast.blocks[0].mixer.q_proj.kernel[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(cast.embed.embedding[...]),
                                np.asarray(kept.embed.embedding[...]).astype(np.float32))


def test_unknown_and_missing_tensors(tmp_path):
  make_neox(tmp_path, seed=3)
  from efficient_lm.interop import gpt_neox_from_state_dict, read_checkpoint
  config, tensors = read_checkpoint(tmp_path)
  tensors = dict(tensors)
  del tensors["gpt_neox.layers.1.attention.dense.bias"]
  tensors["gpt_neox.layers.0.attention.rogue"] = np.zeros(2, np.float32)
  tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = np.zeros(2, np.float32)   # old buffer: ignored
  with pytest.raises(CheckpointMismatch) as e:
    gpt_neox_from_state_dict(config, tensors)
  msg = str(e.value)
  assert "missing tensors (1): gpt_neox.layers.1.attention.dense.bias" in msg
  assert "unknown tensors (1): gpt_neox.layers.0.attention.rogue" in msg


def test_convert_to_dijiang_keeps_the_pythia_weights(tmp_path):
  hf = make_neox(tmp_path, seed=4)
  ours = load_gpt_neox(tmp_path)
  dj = convert_to_dijiang(ours)
  assert dj.config.kind == "dijiang" and dj.config.rope_fraction == 0.25
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  for i, blk in enumerate(dj.blocks):
    p = f"gpt_neox.layers.{i}."
    # DiJiang's fused qkv is GPT-NeoX's query_key_value, layout [H, 3, p] included.
    np.testing.assert_array_equal(blk.mixer.qkv.kernel[...], sd[p + "attention.query_key_value.weight"].T)
    np.testing.assert_array_equal(blk.mixer.qkv.bias[...], sd[p + "attention.query_key_value.bias"])
    np.testing.assert_array_equal(blk.mixer.dense.kernel[...], sd[p + "attention.dense.weight"].T)
    np.testing.assert_array_equal(blk.mlp.up.bias[...], sd[p + "mlp.dense_h_to_4h.bias"])
  assert np.isfinite(np.asarray(dj(jnp.asarray(TOKS)))).all()


def test_reader_agrees_with_the_safetensors_package(tmp_path):
  make_neox(tmp_path, seed=5, dtype=torch.bfloat16)
  from safetensors.torch import load_file
  theirs = load_file(str(next(tmp_path.glob("*.safetensors"))))
  ours, _ = read_safetensors(next(tmp_path.glob("*.safetensors")))
  assert set(ours) == set(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(np.asarray(ours[k], np.float32), v.float().numpy())
