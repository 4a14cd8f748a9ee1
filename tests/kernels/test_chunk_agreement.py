"""The chunked XLA form against the float32 scan reference: outputs, final states, every gradient."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import assert_rel_close
from tests.kernels.recurrence_cases import VARIANTS, as_f32, grads, make_inputs, random_cotangents, run

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}


def check_against_reference(variant, inputs, tol, chunk_sizes, seed, segment_ids=None, impl="chunk"):
  """Forward and all gradients (q, k, v, g/beta, initial_state) of `impl` vs the f32 scan."""
  cts = random_cotangents(seed, *jax.eval_shape(
      lambda: run(variant=variant, impl="scan", inputs=as_f32(inputs), segment_ids=segment_ids)))
  ref_o, ref_s, ref_d = grads(variant=variant, impl="scan", inputs=as_f32(inputs), cotangents=cts, segment_ids=segment_ids)
  for c in chunk_sizes:
    o, s, d = grads(variant=variant, impl=impl, inputs=inputs, cotangents=cts, chunk_size=c, segment_ids=segment_ids)
    assert o.dtype == inputs["v"].dtype and s.dtype == jnp.float32
    assert_rel_close(f"o (C={c})", ref_o, o, tol)
    assert_rel_close(f"final_state (C={c})", ref_s, s, tol)
    for name in inputs:
      assert d[name].dtype == inputs[name].dtype, name
      assert_rel_close(f"d{name} (C={c})", ref_d[name], d[name], tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("t", [1, 17, 64, 100, 257])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunk_matches_scan(variant, t, dtype):
  seed = zlib.crc32(f"{variant}-{t}-{dtype.__name__}".encode())
  inputs = make_inputs(seed, variant, t=t, dtype=dtype)
  check_against_reference(variant, inputs, TOL[dtype], (16, 64), seed)


@pytest.mark.parametrize("gate_scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("variant", ["gla_scalar", "gla_perdim", "gated_delta"])
def test_gate_strength_sweep(variant, gate_scale):
  inputs = make_inputs(7, variant, t=100, gate_scale=gate_scale)
  check_against_reference(variant, inputs, TOL[jnp.float32], (32,), 7)


@pytest.mark.parametrize("variant", ["gla_scalar", "gla_perdim", "gated_delta"])
def test_strong_decay_stays_finite(variant):
  """g around -5 per step: a chunk's cumulative decay reaches -320, far past exp's fp32 range."""
  inputs = make_inputs(11, variant, t=130)
  rng = np.random.default_rng(11)
  inputs["g"] = jnp.asarray(-5.0 + 0.5 * rng.standard_normal(inputs["g"].shape), jnp.float32).clip(max=0.0)
  check_against_reference(variant, inputs, TOL[jnp.float32], (64,), 11)


def random_segments(rng, b, t, n_docs):
  ids = np.zeros((b, t), np.int32)
  for row in range(b):
    starts = np.sort(rng.choice(np.arange(1, t), n_docs - 1, replace=False))
    for s in starts:
      ids[row, s:] += 1
  return ids


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_segment_ids_against_scan(variant):
  inputs = make_inputs(3, variant, t=150)
  seg = jnp.asarray(random_segments(np.random.default_rng(3), 2, 150, 5))
  check_against_reference(variant, inputs, TOL[jnp.float32], (16, 64), 3, segment_ids=seg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_segment_ids_equal_separate_runs(variant):
  """Packed documents give what each document gives alone; initial_state feeds the first only."""
  t = 120
  inputs = make_inputs(5, variant, b=1, t=t)
  bounds = [0, 23, 24, 90, t]  # includes a one-token document
  seg = np.zeros((1, t), np.int32)
  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    seg[:, lo:hi] = i
  o, s = run(variant=variant, impl="chunk", inputs=inputs, chunk_size=16, segment_ids=jnp.asarray(seg))
  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    doc = {name: (x[:, lo:hi] if x.ndim >= 3 and name != "s0" else x) for name, x in inputs.items()}
    if i > 0:
      doc["s0"] = jnp.zeros_like(inputs["s0"])
    o_doc, s_doc = run(variant=variant, impl="chunk", inputs=doc, chunk_size=16)
    assert_rel_close(f"o of document {i}", o_doc, o[:, lo:hi], 1e-5)
  assert_rel_close("final state = last document's", s_doc, s, 1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_steps_equals_one_pass(variant):
  import pallas_kernels as pk

  t, t0 = 40, 29
  inputs = make_inputs(9, variant, t=t)
  o_full, s_full = run(variant=variant, impl="chunk", inputs=inputs, chunk_size=16)
  prefix = {name: (x[:, :t0] if name != "s0" else x) for name, x in inputs.items()}
  o_pre, state = run(variant=variant, impl="chunk", inputs=prefix, chunk_size=16)
  outs = [o_pre]
  for i in range(t0, t):
    tok = {name: x[:, i] for name, x in inputs.items() if name != "s0"}
    if VARIANTS[variant][0] == "gla":
      o_t, state = pk.gla_step(tok["q"], tok["k"], tok["v"], tok.get("g"), state)
    else:
      o_t, state = pk.delta_rule_step(tok["q"], tok["k"], tok["v"], tok["beta"], state, g=tok.get("g"))
    outs.append(o_t[:, None])
  assert_rel_close("o", o_full, jnp.concatenate(outs, axis=1), 1e-5)
  assert_rel_close("state", s_full, state, 1e-5)


def test_heads_and_key_value_widths():
  """H > 1 with K != V in both directions, and the Rodimus shape (one head, V >> K)."""
  for kd, vd, h in ((32, 8, 3), (8, 64, 1)):
    for variant in ("gla_perdim", "gated_delta"):
      inputs = make_inputs(13, variant, t=70, h=h, kd=kd, vd=vd)
      check_against_reference(variant, inputs, TOL[jnp.float32], (32,), 13)
