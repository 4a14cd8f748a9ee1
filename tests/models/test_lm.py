"""Every tiny preset: shapes, causality, prefill + decode == forward, scan == chunk (logits and
gradients), a few optimizer steps lower the loss, packed documents are isolated."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import assert_rel_close
from tests.models.helpers import TINY, compiled, next_token_loss, tokens, tree_rel_err

T = 20  # > the tiny chunk size (16) and > the tiny windows (8), not a multiple of either


# Presets whose layers include a recurrence (scan and chunk forms to compare), and the presets
# trained for a few steps (the hybrids reuse layers already trained elsewhere).
RECURRENT = ["rodimus-tiny", "rodimus_plus-tiny", "deltanet-tiny", "gated_deltanet-tiny", "gla-tiny",
             "linear_attention-tiny", "dijiang-tiny"]
TRAINED = [n for n in TINY if not n.startswith("deltanet_")]


@pytest.fixture(params=TINY)
def cm(request):
  return compiled(request.param)


@pytest.fixture(params=RECURRENT)
def cm_recurrent(request):
  return compiled(request.param)


@pytest.fixture(params=TRAINED)
def cm_trained(request):
  return compiled(request.param)


def zeros_seg(b, t):
  return jnp.zeros((b, t), jnp.int32)


def test_forward_shapes_and_dtype(cm):
  toks = tokens(np.random.randint(1 << 30), (2, T))
  logits = cm.forward(cm.params, cm.rest, toks, zeros_seg(2, T))
  assert logits.shape == (2, T, cm.cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


def test_causality(cm):
  seed = np.random.randint(1 << 30)
  toks = tokens(seed, (2, T))
  t = 11
  changed = toks.at[:, t].set((toks[:, t] + 1 + tokens(seed + 1, (2,), 255)) % 256)
  a = np.asarray(cm.forward(cm.params, cm.rest, toks, zeros_seg(2, T)))
  b = np.asarray(cm.forward(cm.params, cm.rest, changed, zeros_seg(2, T)))
  np.testing.assert_allclose(b[:, :t], a[:, :t], rtol=1e-5, atol=1e-5)
  assert np.abs(b[:, t:] - a[:, t:]).max() > 1e-4, "changing token t must change logits from t on"


def test_prefill_then_decode_equals_forward(cm):
  toks = tokens(np.random.randint(1 << 30), (2, T))
  full = cm.forward(cm.params, cm.rest, toks, zeros_seg(2, T))
  prompt = 11   # longer than the tiny windows, so ring buffers wrap during prefill
  logits, cache = cm.prefill(cm.params, cm.rest, toks[:, :prompt], T)
  outs = [logits]
  for t in range(prompt, T):
    step, cache = cm.decode(cm.params, cm.rest, toks[:, t:t + 1], cache)
    outs.append(step)
  assert_rel_close("prefill+decode", full, jnp.concatenate(outs, axis=1), 1e-5)
  assert int(cache["pos"]) == T


def test_decode_from_empty_cache(cm):
  toks = tokens(np.random.randint(1 << 30), (2, T))
  full = cm.forward(cm.params, cm.rest, toks, zeros_seg(2, T))
  cache = cm.model.init_cache(2, T)
  outs = []
  for t in range(T):
    step, cache = cm.decode(cm.params, cm.rest, toks[:, t:t + 1], cache)
    outs.append(step)
  assert_rel_close("decode only", full, jnp.concatenate(outs, axis=1), 1e-5)


def test_scan_and_chunk_agree(cm_recurrent):
  cm = cm_recurrent
  assert cm.cfg.impl == "auto"   # "chunk" on CPU
  toks = tokens(np.random.randint(1 << 30), (4, T))
  seg = jnp.asarray(np.repeat([[0, 1]], T // 2, axis=1).reshape(1, T).repeat(4, 0))
  (loss_c, logits_c), grads_c = cm.grad(cm.params, cm.rest, toks, seg)
  (loss_s, logits_s), grads_s = cm.with_impl("scan")(cm.params, cm.rest, toks, seg)
  assert_rel_close("logits scan vs chunk", logits_s, logits_c, 1e-4)
  err = tree_rel_err(grads_c, grads_s)
  assert err < 1e-4, f"gradients scan vs chunk: relative error {err:.2e}"
  assert tree_rel_err(grads_c, jax.tree.map(jnp.zeros_like, grads_c)) > 0.5   # gradients are not all zero


def test_optimizer_steps_lower_the_loss(cm_trained):
  cm = cm_trained
  toks = tokens(np.random.randint(1 << 30), (4, T))
  seg = zeros_seg(4, T)
  tx = optax.adam(3e-3)
  params = cm.params
  state = tx.init(params)
  losses = []
  for _ in range(6):
    (loss, _), grads = cm.grad(params, cm.rest, toks, seg)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.1, f"loss did not go down: {losses}"


def test_segments_isolate_packed_documents(cm):
  seed = np.random.randint(1 << 30)
  doc1, doc2 = tokens(seed, (1, 8)), tokens(seed + 1, (1, T - 8))
  packed = jnp.concatenate([doc1, doc2], axis=1)
  pad = lambda d: jnp.pad(d, ((0, 0), (0, T - d.shape[1])))
  seg = jnp.asarray([[3] * 8 + [7] * (T - 8), [0] * T])
  # Batch shapes match the other tests, so the compiled forward is reused.
  out = cm.forward(cm.params, cm.rest, jnp.concatenate([packed, pad(doc1)]), seg)
  ref = cm.forward(cm.params, cm.rest, jnp.concatenate([pad(doc2), packed]), zeros_seg(2, T))
  assert_rel_close("document 1", out[1, :8], out[0, :8], 1e-5)
  assert_rel_close("document 2", ref[0, :T - 8], out[0, 8:], 1e-5)
  # Without segment ids document 2 sees document 1.
  assert np.abs(np.asarray(ref[1, 8:] - ref[0, :T - 8])).max() > 1e-4


def test_an_id_that_comes_back_is_a_new_document(cm):
  """Ids 4, 9, 4 are three documents (the state and the attention restart at every change), the
  same as ids 0, 1, 2: an attention mask that compared ids would let the third see the first."""
  x = tokens(np.random.randint(1 << 30), (2, T))
  runs = [6, 5, T - 11]
  seg_repeat = jnp.asarray([[4] * runs[0] + [9] * runs[1] + [4] * runs[2]] * 2)
  seg_runs = jnp.asarray([[0] * runs[0] + [1] * runs[1] + [2] * runs[2]] * 2)
  out = cm.forward(cm.params, cm.rest, x, seg_repeat)
  ref = cm.forward(cm.params, cm.rest, x, seg_runs)
  assert_rel_close("logits", ref, out, 1e-6)
