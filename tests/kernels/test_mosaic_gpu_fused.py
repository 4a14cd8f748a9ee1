"""The fused Mosaic GPU GLA kernels (`chunk_kernels_mosaic_gpu`, scalar or no decay) against the
float32 scan under Mosaic GPU interpret mode: the forward's outputs, final state and stored states
entering every chunk; forward and every gradient of `gla(impl="pallas")`, which takes them under
PALLAS_KERNELS_INTERPRET=mosaic_gpu; their lowering to the Mosaic GPU custom call for CUDA.
jax >= 0.11 (the Python 3.12 CI leg): older jax has no Mosaic GPU interpret mode."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import pytest
from jax import export

import pallas_kernels as pk
from pallas_kernels.common import chunk_kernels_mosaic_gpu, state_pass_mosaic_gpu
from pallas_kernels.ops.gla.scan import gla_scan
from tests.conftest import assert_rel_close
from tests.kernels.recurrence_cases import kernel_names, make_inputs
from tests.kernels.test_chunk_agreement import TOL, check_against_reference

# Interpret mode fails on the CPU with jax 0.11.2 (no `eval_jaxpr` rule, no CPU rule for wgmma):
# jax >= 0.12.
pytestmark = pytest.mark.skipif(
    state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64) is not None or jax.__version_info__ < (0, 12),
    reason=state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64)
    or f"Mosaic GPU interpret mode fails on the CPU with jax {jax.__version__}")

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


@pytest.mark.parametrize("t, kd, vd", [(128, 64, 64), (150, 64, 128), (100, 128, 64)],
                         ids=["T128-K64-V64", "T150-K64-V128", "T100-K128-V64"])
@pytest.mark.parametrize("variant", ["gla_scalar", "gla_nodecay"])
def test_fused_gradients_match_scan(variant, t, kd, vd):
  """`gla(impl="pallas")` on the Mosaic GPU kernels: output, final state and dq, dk, dv, dg, ds0
  against the float32 scan, with a nonzero initial state; T 150 and 100 pad the last chunk, V 128
  has two value blocks, K 128 two key blocks (whose shares of dg add up)."""
  seed = zlib.crc32(f"fused-grad-{variant}-{t}-{kd}-{vd}".encode())
  inputs = make_inputs(seed, variant, b=1, t=t, h=2, kd=kd, vd=vd, dtype=jnp.bfloat16)
  check_against_reference(variant, inputs, BF16, (CHUNK,), seed, impl="pallas:mosaic_gpu")


def test_fused_gradients_weak_decay():
  """g around -0.02 a token: lambda and d stay near one, so the state and its gradient carry
  across chunks (at g around -1, lambda = exp(b_C) is about e^-50 and every cross-chunk term of
  the gradients, lambda <H, S> in dg included, vanishes below the tolerance)."""
  inputs = make_inputs(11, "gla_scalar", b=1, t=150, h=2, kd=128, vd=64, dtype=jnp.bfloat16, gate_scale=0.02)
  check_against_reference("gla_scalar", inputs, BF16, (CHUNK,), 11, impl="pallas:mosaic_gpu")


def test_fused_gradients_strong_decay():
  """g around -10 a token: Gamma^T of the reverse pass masked in the exponent as the forward's."""
  inputs = make_inputs(9, "gla_scalar", b=1, t=2 * CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16, gate_scale=10.0)
  check_against_reference("gla_scalar", inputs, BF16, (CHUNK,), 9, impl="pallas:mosaic_gpu")



def test_pallas_gla_routes_scalar_decay_to_the_fused_kernels(monkeypatch):
  """Scalar or no decay, with or without segment ids: the fused kernels, forward and backward; a
  per-dimension decay the per-dimension module's fused kernels; PALLAS_KERNELS_FUSED=0 the
  state-pass kernels."""
  monkeypatch.setenv("PALLAS_KERNELS_INTERPRET", "mosaic_gpu")
  monkeypatch.delenv("PALLAS_KERNELS_FUSED", raising=False)
  x = make_inputs(3, "gla_scalar", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  per_dim = make_inputs(3, "gla_perdim", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)["g"]
  seg = jnp.zeros((1, CHUNK), jnp.int32)

  def names(g, segment_ids=None):
    loss = lambda q: pk.gla(q, x["k"], x["v"], g, segment_ids=segment_ids, impl="pallas")[0].astype(jnp.float32).sum()
    return kernel_names(jax.grad(loss), x["q"])

  fused = ["_forward_body", "_state_grad_body", "_chunk_grad_body"]
  assert names(x["g"]) == fused
  assert names(None) == fused
  assert names(x["g"], seg) == fused
  assert names(None, seg) == fused
  assert names(per_dim) == ["_perdim_scores_body", "_perdim_forward_body", "_perdim_state_grad_body",
                            "_perdim_chunk_grad_body"]
  monkeypatch.setenv("PALLAS_KERNELS_FUSED", "0")
  assert "_state_grad_body" not in names(x["g"])


def test_fused_backward_refusals():
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)

  def backward(kd, chunk, g_shape=(1, 256, 1), dt=jnp.bfloat16):
    args = (spec(1, 256, 1, kd, dt=dt), spec(1, 256, 1, kd, dt=dt), spec(1, 256, 1, 64, dt=dt),
            spec(*g_shape, dt=jnp.float32), spec(1, 256 // chunk, kd, 64), spec(1, 256, 1, 64, dt=dt),
            spec(1, kd, 64, dt=jnp.float32))
    f = lambda *a: chunk_kernels_mosaic_gpu.backward(*a, scale=0.1, chunk=chunk, interpret=True)
    return jax.eval_shape(f, *args)

  assert backward(64, 64)[3].shape == (1, 256, 1)
  with pytest.raises(ValueError, match="backward: only a scalar"):
    backward(64, 64, g_shape=(1, 256, 1, 64))
  with pytest.raises(ValueError, match="backward: wgmma takes float32 only as TF32"):
    backward(64, 64, dt=jnp.float32)
  with pytest.raises(ValueError, match="backward: chunk_size must be a multiple of 64"):
    backward(64, 32)
  with pytest.raises(ValueError, match="backward: .* KiB of shared memory per block"):
    backward(256, 128)


@pytest.mark.parametrize("kd, vd, gated", [(64, 128, True), (128, 64, False), (256, 64, True)],
                         ids=["K64-V128-g", "K128-V64-nodecay", "K256-V64-g"])
def test_fused_backward_lowers_for_cuda(kd, vd, gated):
  """The forward and both backward kernels through the Mosaic GPU lowering (layout inference
  included), as `test_fused_forward_lowers_for_cuda`."""
  import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401, PLC0415

  b, t, h = 2, 4 * CHUNK, 2
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  g = spec(b, t, h, dt=jnp.float32) if gated else None

  def loss(q, k, v, g, s0):
    o, s = chunk_kernels_mosaic_gpu.fused_gla(kd ** -0.5, CHUNK, False, q, k, v, g, s0)
    return o.astype(jnp.float32).sum() + s.sum()

  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4) if gated else (0, 1, 2, 4))
  exported = export.export(jax.jit(grad), platforms=["cuda"])(
      spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), g, spec(b, h, kd, vd, dt=jnp.float32))
  assert exported.mlir_module().count("mosaic_gpu_v2") == 3


# ---------------------------------------------------------------------------------------------
# Segment ids (packed sequences)


def _segments(t, starts_per_row):
  """[B, T] int32 ids that change at each row's `starts`."""
  return jnp.stack([jnp.cumsum(jnp.zeros(t, jnp.int32).at[jnp.asarray(starts)].set(1)) for starts in starts_per_row])


# Row 0: a boundary inside chunk 0, one exactly at chunk 1's first token (its entering state feeds
# none of it) and two inside chunk 1 (a middle segment touching neither end); chunk 2 carries the
# state of chunk 1's last segment. Row 1: chunk 0's last token starts a segment (d of one token),
# which chunk 1 continues, and chunk 2's last token starts one.
SEG_STARTS = ([20, 64, 90, 110], [63, 130, 191])


@pytest.mark.parametrize("kd, vd, store_states", [(64, 128, True), (128, 64, False)],
                         ids=["K64-V128-states", "K128-V64-no-states"])
@pytest.mark.parametrize("variant", ["gla_scalar", "gla_nodecay"])
def test_fused_forward_segments_match_scan(variant, kd, vd, store_states):
  """`forward` with segment ids: O and the final state against the float32 scan with the same ids
  (weak decay: a strong one would hide what crosses the chunks), a nonzero initial state."""
  t = 3 * CHUNK
  x = make_inputs(zlib.crc32(f"fused-seg-{variant}-{kd}".encode()), variant, b=2, t=t, h=2, kd=kd, vd=vd,
                  dtype=jnp.bfloat16, gate_scale=0.02)
  seg = _segments(t, SEG_STARTS)
  f32 = {name: a.astype(jnp.float32) for name, a in x.items()}
  ref_o, ref_s = gla_scan(f32["q"], f32["k"], f32["v"], f32.get("g"), scale=kd ** -0.5, s0=f32["s0"],
                          segment_ids=seg)
  o, s, _ = chunk_kernels_mosaic_gpu.forward(
      x["q"], x["k"], x["v"], x.get("g"), _flat_heads(x["s0"]), scale=kd ** -0.5, chunk=CHUNK,
      store_states=store_states, interpret=True, seg=seg)
  assert_rel_close("o", ref_o, o, BF16)
  assert_rel_close("final state", _flat_heads(ref_s), s, BF16)


@pytest.mark.parametrize("t, kd, vd, gate_scale", [(150, 64, 128, 1.0), (150, 128, 64, 0.02), (192, 64, 64, 0.02)],
                         ids=["T150-K64-V128", "T150-K128-V64-weak", "T192-K64-V64-weak"])
@pytest.mark.parametrize("variant", ["gla_scalar", "gla_nodecay"])
def test_fused_gradients_segments_match_scan(variant, t, kd, vd, gate_scale):
  """`gla(impl="pallas", segment_ids=...)` on the Mosaic GPU kernels: output, final state and dq,
  dk, dv, dg, ds0 against the float32 scan with the same ids; T 150 pads the last chunk (its ids
  repeat the last one), the weak decay (g around -0.02) keeps the state and its gradient across
  chunks (lambda <H, S> in dg included), K 128 has two key blocks."""
  seed = zlib.crc32(f"fused-seg-grad-{variant}-{t}-{kd}-{gate_scale}".encode())
  inputs = make_inputs(seed, variant, b=2, t=t, h=2, kd=kd, vd=vd, dtype=jnp.bfloat16, gate_scale=gate_scale)
  seg = _segments(t, [[s for s in starts if s < t] for starts in SEG_STARTS])
  check_against_reference(variant, inputs, BF16, (CHUNK,), seed, segment_ids=seg, impl="pallas:mosaic_gpu")


def test_fused_segment_counts():
  """`chunk_segments_BNC`: 0 while the segment of the state entering the chunk goes on (the first
  chunk's first token never starts one), one more at each id change, a chunk's first token
  included; a recurring id starts a segment again, as the scan restarts."""
  seg = jnp.asarray([[7, 7, 8, 8, 8, 3, 3, 7]])
  counts = chunk_kernels_mosaic_gpu.chunk_segments_BNC(seg, 4)
  assert counts.dtype == jnp.float32
  assert counts.tolist() == [[[0, 0, 1, 1], [0, 1, 1, 2]]]


@pytest.mark.parametrize("kd, vd, gated", [(64, 128, True), (128, 64, False), (256, 64, True)],
                         ids=["K64-V128-g", "K128-V64-nodecay", "K256-V64-g"])
def test_fused_segments_lower_for_cuda(kd, vd, gated):
  """The forward and both backward kernels with segment ids through the Mosaic GPU lowering, as
  `test_fused_backward_lowers_for_cuda`."""
  import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401, PLC0415

  b, t, h = 2, 4 * CHUNK, 2
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  g = spec(b, t, h, dt=jnp.float32) if gated else None

  def loss(q, k, v, g, s0, seg):
    o, s = chunk_kernels_mosaic_gpu.fused_gla(kd ** -0.5, CHUNK, False, q, k, v, g, s0, seg)
    return o.astype(jnp.float32).sum() + s.sum()

  args = (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), g, spec(b, h, kd, vd, dt=jnp.float32),
          spec(b, t, dt=jnp.int32))
  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4) if gated else (0, 1, 2, 4))
  assert export.export(jax.jit(grad), platforms=["cuda"])(*args).mlir_module().count("mosaic_gpu_v2") == 3
  # The forward alone: no stored states.
  assert export.export(jax.jit(loss), platforms=["cuda"])(*args).mlir_module().count("mosaic_gpu_v2") == 1


# ---------------------------------------------------------------------------------------------
# The Hopper default (dispatch.MOSAIC_GPU_FASTER)


def test_hopper_default_takes_the_mosaic_gpu_kernels_for_gla(monkeypatch):
  """On a (pretended) H100 under PALLAS_KERNELS_GPU=auto, `gla(impl="pallas")` with a scalar or no
  decay traces the fused Mosaic GPU forward and backward; =triton, a per-dimension decay or
  float32 inputs keep the Triton kernels."""
  from pallas_kernels import _compat, dispatch
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(dispatch, "_hopper", lambda: True)
  monkeypatch.setattr(_compat, "has_triton_backend", lambda: True)
  monkeypatch.delenv("PALLAS_KERNELS_GPU", raising=False)
  monkeypatch.delenv("PALLAS_KERNELS_FUSED", raising=False)
  x = make_inputs(5, "gla_scalar", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  per_dim = make_inputs(5, "gla_perdim", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)["g"]

  def names(g, dtype=jnp.bfloat16):
    loss = lambda q: pk.gla(q, x["k"].astype(dtype), x["v"].astype(dtype), g, impl="pallas")[0].astype(jnp.float32).sum()
    return kernel_names(jax.grad(loss), x["q"].astype(dtype))

  for g in (x["g"], None):
    mosaic = names(g)
    assert mosaic[0] == "_forward_body" and "_state_grad_body" in mosaic and "_state_grad_kernel" not in mosaic
  assert "_forward_body" not in names(per_dim)
  assert "_forward_body" not in names(x["g"], jnp.float32)
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "triton")
  assert "_forward_body" not in names(x["g"]) and "_forward_kernel" in names(x["g"])
