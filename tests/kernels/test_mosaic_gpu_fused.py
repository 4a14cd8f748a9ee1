"""The fused Mosaic GPU GLA forward (`chunk_kernels_mosaic_gpu.forward`, scalar or no decay)
against the float32 scan under Mosaic GPU interpret mode: outputs, final state and the stored
states entering every chunk; its lowering to the Mosaic GPU custom call for CUDA. jax >= 0.11 (the
Python 3.12 CI leg): older jax has no Mosaic GPU interpret mode."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels.common import chunk_kernels_mosaic_gpu, state_pass_mosaic_gpu
from pallas_kernels.ops.gla.scan import gla_scan
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
    part = {name: f32[name][:, start:start + chunk] for name in ("q", "k", "v", "g") if name in f32}
    states.append(_flat_heads(s_BHKV))
    o, s_BHKV = gla_scan(part["q"], part["k"], part["v"], part.get("g"), scale=scale, s0=s_BHKV,
                         segment_ids=None)
    o_chunks.append(o)
  return jnp.concatenate(o_chunks, axis=1), jnp.stack(states, axis=1), _flat_heads(s_BHKV)


def _forward(x, store_states):
  return chunk_kernels_mosaic_gpu.forward(
      x["q"], x["k"], x["v"], x.get("g"), _flat_heads(x["s0"]), scale=x["q"].shape[-1] ** -0.5,
      chunk=CHUNK, store_states=store_states, interpret=True)


@pytest.mark.parametrize("store_states", [True, False], ids=["states", "no-states"])
@pytest.mark.parametrize("kd, vd", [(64, 128), (128, 64)], ids=["K64-V128", "K128-V64"])
@pytest.mark.parametrize("variant", ["gla_scalar", "gla_nodecay"])
def test_fused_forward_matches_scan(variant, kd, vd, store_states):
  """Three chunks, two batch rows and two heads (the kernel splits its flat program index), two
  value blocks at V 128, a nonzero initial state."""
  seed = zlib.crc32(f"fused-{variant}-{kd}-{vd}-{store_states}".encode())
  x = make_inputs(seed, variant, b=2, t=3 * CHUNK, h=2, kd=kd, vd=vd,
                  dtype=jnp.bfloat16)
  ref_o, ref_states, ref_s = _scan_by_chunks(x, CHUNK)
  o, s, states = _forward(x, store_states)
  assert o.dtype == x["v"].dtype and s.dtype == jnp.float32
  assert_rel_close("o", ref_o, o, BF16)
  assert_rel_close("final state", ref_s, s, BF16)
  if store_states:
    assert states.dtype == x["q"].dtype and states.shape == ref_states.shape
    assert_rel_close("states entering the chunks", ref_states, states, BF16)
  else:
    assert states is None


def test_fused_forward_strong_decay():
  """g around -10 a token: the in-chunk decays underflow exp's float32 range, and exp(b_i - b_j)
  above the diagonal would overflow if it were not masked in the exponent."""
  x = make_inputs(5, "gla_scalar", b=1, t=2 * CHUNK, h=2, kd=64, vd=64, dtype=jnp.bfloat16, gate_scale=10.0)
  ref_o, ref_states, ref_s = _scan_by_chunks(x, CHUNK)
  o, s, states = _forward(x, True)
  assert_rel_close("o", ref_o, o, BF16)
  assert_rel_close("final state", ref_s, s, BF16)
  assert_rel_close("states entering the chunks", ref_states, states, BF16)


def test_fused_forward_refusals():
  x = make_inputs(1, "gla_perdim", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="only a scalar"):
    _forward(x, False)
  x = make_inputs(1, "gla_scalar", b=1, t=CHUNK + 8, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="T must be a multiple of the chunk"):
    _forward(x, False)
  x = make_inputs(1, "gla_scalar", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.float32)
  with pytest.raises(ValueError, match="wgmma takes float32 only as TF32"):
    _forward(x, False)


@pytest.mark.parametrize("kd, vd, gated, store_states", [(64, 128, True, True), (128, 64, False, True),
                                                         (128, 128, True, False), (256, 64, True, True)],
                         ids=["K64-V128-g-states", "K128-V64-nodecay-states", "K128-V128-g", "K256-V64-g-states"])
def test_fused_forward_lowers_for_cuda(kd, vd, gated, store_states):
  """Interpret mode checks neither layouts nor wgmma operand rules; the Mosaic GPU lowering does.
  Its rule registers only with a GPU plugin, so the test imports the registration itself. K 256
  leaves room for one buffer slot only."""
  import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401, PLC0415

  b, t, h = 2, 4 * CHUNK, 2
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  args = (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h, dt=jnp.float32) if gated else None,
          spec(b * h, kd, vd, dt=jnp.float32))

  def f(q, k, v, g, s0):
    return chunk_kernels_mosaic_gpu.forward(q, k, v, g, s0, scale=kd ** -0.5, chunk=CHUNK, store_states=store_states)

  exported = export.export(jax.jit(f), platforms=["cuda"])(*args)
  assert exported.mlir_module().count("mosaic_gpu_v2") == 1
