"""The fused Mosaic GPU delta-rule forward (`delta_kernels_mosaic_gpu.forward`, gated by a scalar
decay or not) against the float32 scan under Mosaic GPU interpret mode: outputs, final state and
the stored states entering every chunk; its lowering to the Mosaic GPU custom call for CUDA.
jax >= 0.11 (the Python 3.12 CI leg): older jax has no Mosaic GPU interpret mode."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.common import delta_kernels_mosaic_gpu, state_pass_mosaic_gpu
from pallas_kernels.ops.delta_rule.scan import delta_rule_scan
from tests.conftest import assert_rel_close
from tests.kernels.recurrence_cases import make_inputs
from tests.kernels.test_chunk_agreement import TOL

pytestmark = pytest.mark.skipif(
    state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64) is not None,
    reason=str(state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64)))

BF16 = TOL[jnp.bfloat16]
CHUNK = 64


def _flat_heads(x_BHKV):
  b, h = x_BHKV.shape[:2]
  return x_BHKV.reshape(b * h, *x_BHKV.shape[2:])


def _scan_by_chunks(x, chunk):
  """The float32 scan run chunk after chunk: O [B, T, H, V], the state entering every chunk
  [B*H, N, K, V] and the final state [B*H, K, V]."""
  f32 = {name: a.astype(jnp.float32) for name, a in x.items()}
  scale = x["q"].shape[-1] ** -0.5
  s_BHKV, o_chunks, states = f32["s0"], [], []
  for start in range(0, x["q"].shape[1], chunk):
    part = {name: f32[name][:, start:start + chunk] for name in ("q", "k", "v", "beta", "g") if name in f32}
    states.append(_flat_heads(s_BHKV))
    o, s_BHKV = delta_rule_scan(part["q"], part["k"], part["v"], part["beta"], part.get("g"), scale=scale,
                                s0=s_BHKV, segment_ids=None)
    o_chunks.append(o)
  return jnp.concatenate(o_chunks, axis=1), jnp.stack(states, axis=1), _flat_heads(s_BHKV)


def _forward(x, store_states, chunk=CHUNK):
  return delta_kernels_mosaic_gpu.forward(
      x["q"], x["k"], x["v"], x["beta"], x.get("g"), _flat_heads(x["s0"]), scale=x["q"].shape[-1] ** -0.5,
      chunk=chunk, store_states=store_states, interpret=True)


def _check_against_scan(x, store_states=True, chunk=CHUNK):
  ref_o, ref_states, ref_s = _scan_by_chunks(x, chunk)
  o, s, states = _forward(x, store_states, chunk)
  assert o.dtype == x["v"].dtype and s.dtype == jnp.float32
  assert_rel_close("o", ref_o, o, BF16)
  assert_rel_close("final state", ref_s, s, BF16)
  if store_states:
    assert states.dtype == x["q"].dtype and states.shape == ref_states.shape
    assert_rel_close("states entering the chunks", ref_states, states, BF16)
  else:
    assert states is None


@pytest.mark.parametrize("store_states", [True, False], ids=["states", "no-states"])
@pytest.mark.parametrize("kd, vd", [(64, 128), (128, 64)], ids=["K64-V128", "K128-V64"])
@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_forward_matches_scan(variant, kd, vd, store_states):
  """Three chunks, two heads, two value blocks at V 128 (each solves the chunk's T itself), a
  nonzero initial state, beta in (0, 1), normalised keys."""
  seed = zlib.crc32(f"mosaic-delta-{variant}-{kd}-{vd}-{store_states}".encode())
  _check_against_scan(make_inputs(seed, variant, b=1, t=3 * CHUNK, h=2, kd=kd, vd=vd, dtype=jnp.bfloat16),
                      store_states)


@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_forward_two_batch_rows(variant):
  """The kernel splits its flat batch*head program index."""
  _check_against_scan(make_inputs(zlib.crc32(f"mosaic-delta-b2-{variant}".encode()), variant, b=2, t=2 * CHUNK,
                                  h=2, kd=64, vd=64, dtype=jnp.bfloat16))


@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_forward_correlated_keys(variant):
  """Keys sharing one direction (k = normalise(randn + 3 u)), beta near 1, no decay or a weak one
  (g = 0.1 logsigmoid(randn), so that A's far blocks still count): (I + A)^-1 is far from I and
  A's powers grow far past it, the case where a solve by the nilpotent product
  (I - A)(I + A^2)(I + A^4)... cancels catastrophically even in float32."""
  x = make_inputs(9, variant, b=1, t=2 * CHUNK, h=2, kd=64, vd=64, dtype=jnp.bfloat16, gate_scale=0.1)
  rng = np.random.default_rng(9)
  k = rng.standard_normal(x["k"].shape) + 3.0 * rng.standard_normal(x["k"].shape[-1])
  x["k"] = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.bfloat16)
  x["beta"] = jnp.asarray(0.9 + 0.1 * rng.random(x["beta"].shape), jnp.bfloat16)
  _check_against_scan(x)


@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_forward_chunk_128(variant):
  """Six levels of the solve's doubling and two wgmma row groups per [C, *] product; a weak decay
  (g = 0.1 logsigmoid(randn)) leaves A's far blocks in play."""
  _check_against_scan(make_inputs(zlib.crc32(f"mosaic-delta-c128-{variant}".encode()), variant, b=1,
                                  t=4 * CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16, gate_scale=0.1),
                      chunk=2 * CHUNK)


def test_delta_forward_strong_decay():
  """g around -10 a token: the in-chunk decays underflow exp's float32 range, and exp(b_i - b_j)
  above the diagonal would overflow if it were not masked in the exponent."""
  _check_against_scan(make_inputs(5, "gated_delta", b=1, t=2 * CHUNK, h=2, kd=64, vd=64, dtype=jnp.bfloat16,
                                  gate_scale=10.0))


def test_delta_forward_refusals():
  x = make_inputs(1, "gated_delta", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  x["g"] = jnp.zeros((1, CHUNK, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match="only a scalar"):
    _forward(x, False)
  x = make_inputs(1, "gated_delta", b=1, t=CHUNK + 8, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="T must be a multiple of the chunk"):
    _forward(x, False)
  x = make_inputs(1, "delta", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.float32)
  with pytest.raises(ValueError, match="wgmma takes float32 only as TF32"):
    _forward(x, False)
  x = make_inputs(1, "delta", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  x["beta"] = x["beta"][..., None]
  with pytest.raises(ValueError, match="beta must be"):
    _forward(x, False)
  x = make_inputs(1, "delta", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  x["v"] = x["v"].astype(jnp.float16)
  with pytest.raises(ValueError, match="q and v must share one dtype"):
    _forward(x, False)
  x = make_inputs(1, "delta", b=1, t=2 * CHUNK, h=1, kd=128, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="KiB of shared memory per block"):
    _forward(x, False, chunk=2 * CHUNK)


@pytest.mark.parametrize("kd, vd, gated, store_states, chunk",
                         [(64, 128, True, True, CHUNK), (128, 64, False, True, CHUNK), (128, 128, True, False, CHUNK),
                          (256, 64, True, True, CHUNK), (64, 64, True, True, 2 * CHUNK)],
                         ids=["K64-V128-g-states", "K128-V64-nodecay-states", "K128-V128-g", "K256-V64-g-states",
                              "C128-K64-V64-g-states"])
def test_delta_forward_lowers_for_cuda(kd, vd, gated, store_states, chunk):
  """Interpret mode checks neither layouts, wgmma operand rules nor shared-memory size; the Mosaic
  GPU lowering does. Its rule registers only with a GPU plugin, so the test imports the
  registration itself. K 256 and chunk 128 leave room for one buffer slot only."""
  import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401, PLC0415

  b, t, h = 2, 4 * CHUNK, 2
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  args = (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h, dt=jnp.float32),
          spec(b, t, h, dt=jnp.float32) if gated else None, spec(b * h, kd, vd, dt=jnp.float32))

  def f(q, k, v, beta, g, s0):
    return delta_kernels_mosaic_gpu.forward(q, k, v, beta, g, s0, scale=kd ** -0.5, chunk=chunk,
                                            store_states=store_states)

  exported = export.export(jax.jit(f), platforms=["cuda"])(*args)
  assert exported.mlir_module().count("mosaic_gpu_v2") == 1
