"""The fused Mosaic GPU GLA kernels for a per-dimension decay (`gla_perdim_kernels_mosaic_gpu`)
against the float32 scan under Mosaic GPU interpret mode: the forward's outputs, final state and
stored states entering every chunk; every gradient of `fused_gla_perdim` (through
`pallas_chunked.run_padded`, as the op's callers pad) against `jax.vjp` of the scan; weak, strong
and mixed decays, segment ids, chunk 128, float16; their lowering to the Mosaic GPU custom call for
CUDA. jax >= 0.12 (the Python 3.12 CI leg): older jax has no Mosaic GPU interpret mode."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.common import gla_perdim_kernels_mosaic_gpu, state_pass_mosaic_gpu
from pallas_kernels.common.pallas_chunked import run_padded
from pallas_kernels.ops.gla.scan import gla_scan
from tests.conftest import assert_rel_close
from tests.kernels.recurrence_cases import as_f32, make_inputs, random_cotangents
from tests.kernels.test_chunk_agreement import TOL

# Interpret mode fails on the CPU with jax 0.11.2 (no `eval_jaxpr` rule, no CPU rule for wgmma):
# jax >= 0.12.
pytestmark = pytest.mark.skipif(
    state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64) is not None or jax.__version_info__ < (0, 12),
    reason=state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64)
    or f"Mosaic GPU interpret mode fails on the CPU with jax {jax.__version__}")

BF16 = TOL[jnp.bfloat16]
CHUNK = 64
NAMES = ("q", "k", "v", "g", "s0")


def _flat_heads(x_BHKV):
  b, h = x_BHKV.shape[:2]
  return x_BHKV.reshape(b * h, *x_BHKV.shape[2:])


def _inputs(seed, *, b=1, t, h=2, kd, vd, decay="normal", dtype=jnp.bfloat16):
  """`make_inputs` with a per-dimension decay g <= 0: "normal" logsigmoid(randn), "weak" 0.02 of it
  (the state and its gradient carry across chunks), "strong" about -20 a step in every dimension
  (a chunk's cumulative decay reaches -1300: far past exp's range), "mixed" half the key
  dimensions as "strong", the other half as "weak", per head (a strong dimension must not wipe
  out the weak ones)."""
  scale = {"normal": 1.0, "weak": 0.02, "strong": 1.0, "mixed": 1.0}[decay]
  x = make_inputs(seed, "gla_perdim", b=b, t=t, h=h, kd=kd, vd=vd, dtype=dtype, gate_scale=scale)
  if decay in ("strong", "mixed"):
    rng = np.random.default_rng(seed + 1)
    strong = np.minimum(-20.0 + rng.standard_normal((b, t, h, kd)), 0.0)
    if decay == "mixed":
      weak = 0.02 * np.asarray(jax.nn.log_sigmoid(rng.standard_normal((b, t, h, kd))))
      strong = np.where(np.arange(kd) % 2 == 0, strong, weak)
    x["g"] = jnp.asarray(strong, dtype)
  return x


def _scan_by_chunks(x, chunk):
  """The float32 scan run chunk after chunk: O [B, T, H, V], the state entering every chunk
  [B*H, N, K, V] and the final state [B*H, K, V]."""
  f32 = as_f32(x)
  scale = x["q"].shape[-1] ** -0.5
  s_BHKV, o_chunks, states = f32["s0"], [], []
  for start in range(0, x["q"].shape[1], chunk):
    part = {name: f32[name][:, start:start + chunk] for name in ("q", "k", "v", "g")}
    states.append(_flat_heads(s_BHKV))
    o, s_BHKV = gla_scan(part["q"], part["k"], part["v"], part["g"], scale=scale, s0=s_BHKV, segment_ids=None)
    o_chunks.append(o)
  return jnp.concatenate(o_chunks, axis=1), jnp.stack(states, axis=1), _flat_heads(s_BHKV)


def _forward(x, store_states, chunk=CHUNK, seg=None):
  return gla_perdim_kernels_mosaic_gpu.forward(
      x["q"], x["k"], x["v"], x["g"], _flat_heads(x["s0"]), scale=x["q"].shape[-1] ** -0.5,
      chunk=chunk, store_states=store_states, interpret=True, seg=seg)


@pytest.mark.parametrize("kd, vd, decay, store_states", [(64, 128, "normal", True), (128, 64, "normal", False),
                                                         (64, 64, "weak", True), (128, 64, "strong", True),
                                                         (64, 64, "mixed", True)],
                         ids=["K64-V128-states", "K128-V64", "K64-weak-states", "K128-strong-states",
                              "K64-mixed-states"])
def test_forward_matches_scan(kd, vd, decay, store_states):
  """Three chunks, two heads (the kernels split their flat program index), two value blocks at V 128
  and two key blocks at K 128, a nonzero initial state; the strong decay (g about -20 a step)
  underflows every cross-chunk and most in-chunk terms, which must then come out finite, and the
  mixed one keeps its weak dimensions' state."""
  seed = zlib.crc32(f"perdim-fwd-{kd}-{vd}-{decay}-{store_states}".encode())
  x = _inputs(seed, t=3 * CHUNK, kd=kd, vd=vd, decay=decay)
  ref_o, ref_states, ref_s = _scan_by_chunks(x, CHUNK)
  o, s, saved = _forward(x, store_states)
  assert o.dtype == x["v"].dtype and s.dtype == jnp.float32
  assert_rel_close("o", ref_o, o, BF16)
  assert_rel_close("final state", ref_s, s, BF16)
  if store_states:
    states = saved[0]
    assert states.dtype == x["q"].dtype and states.shape == ref_states.shape
    assert_rel_close("states entering the chunks", ref_states, states, BF16)
  else:
    assert saved is None


def test_forward_chunk_128_matches_scan():
  """Chunk 128: seven levels of scores, a [128, 128] P."""
  x = _inputs(21, t=2 * 128, h=1, kd=64, vd=64)
  ref_o, _, ref_s = _scan_by_chunks(x, 128)
  o, s, _ = _forward(x, False, chunk=128)
  assert_rel_close("o", ref_o, o, BF16)
  assert_rel_close("final state", ref_s, s, BF16)


def test_scores_match_float64():
  """`scores` against the intra-chunk scores in float64 under the mixed decay, entry by entry where
  they matter: P's bf16 rounding (2^-9) and its operands' (K', Q' factors in bf16) bound the error
  by a few 2^-8 of each row's largest entry, while an unstable factorisation loses whole rows to
  inf / NaN or underflow. Also e * Q, d * K and lambda."""
  x = _inputs(5, t=CHUNK, h=1, kd=64, vd=64, decay="mixed")
  cum_g = gla_perdim_kernels_mosaic_gpu.chunk_cumsum(x["g"], CHUNK)
  p, qe, kdk, lam = gla_perdim_kernels_mosaic_gpu.scores(x["q"], x["k"], cum_g, None, scale=1.0, chunk=CHUNK,
                                                           interpret=True)
  q, k = (np.asarray(x[n][0, :, 0], np.float64) for n in ("q", "k"))
  b = np.cumsum(np.asarray(x["g"][0, :, 0], np.float64), axis=0)
  diff = b[:, None, :] - b[None, :, :]
  causal = np.tril(np.ones((CHUNK, CHUNK), bool))
  ref = np.einsum("ik,jk,ijk->ij", q, k, np.exp(np.where(causal[..., None], diff, -np.inf)))
  got = np.asarray(p[0, 0], np.float64)
  assert np.all(np.isfinite(got))
  row_scale = np.abs(ref).max(axis=1, keepdims=True)
  assert np.max(np.abs(got - ref) / row_scale) < 2e-2
  assert_rel_close("P", ref, got, BF16)
  assert_rel_close("e * Q", q * np.exp(b), qe[0, :, 0], BF16)
  assert_rel_close("d * K", k * np.exp(b[-1] - b), kdk[0, :, 0], BF16)
  assert_rel_close("lambda", np.exp(b[-1]), lam[0, 0], 1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_chunk_cumsum_matches_float64(dtype):
  """The in-chunk cumulative sum as a matmul by the lower-triangular ones: float32 sums of g's
  values in any dtype (a strong decay: the sums reach about -300 within a chunk)."""
  g = (-jnp.abs(5 * jax.random.normal(jax.random.key(3), (2, 3 * CHUNK, 3, 64)))).astype(dtype)
  ref = np.cumsum(np.asarray(g, np.float64).reshape(2, 3, CHUNK, 3, 64), axis=2).reshape(g.shape)
  got = gla_perdim_kernels_mosaic_gpu.chunk_cumsum(g, CHUNK)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6, atol=0)


def test_forward_refusals():
  x = make_inputs(1, "gla_scalar", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="only a per-dimension"):
    _forward(x, False)
  x = make_inputs(1, "gla_perdim", b=1, t=CHUNK + 8, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="T must be a multiple of the chunk"):
    _forward(x, False)
  x = make_inputs(1, "gla_perdim", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.float32)
  with pytest.raises(ValueError, match="wgmma takes float32 only as TF32"):
    _forward(x, False)
  x = make_inputs(1, "gla_perdim", b=1, t=192, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="power of two"):
    _forward(x, False, chunk=192)
  x = make_inputs(1, "gla_perdim", b=1, t=128, h=1, kd=256, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="KiB of shared memory per block"):
    _forward(x, False, chunk=128)


def test_fused_unsupported():
  """Chunk 64 fits every K up to 256 and chunk 128 up to K 128 (the walks' e * Q and d * K tiles
  grow with K; `chunk_grads` with C^2)."""
  for kd in (64, 128, 256):
    assert gla_perdim_kernels_mosaic_gpu.fused_unsupported(64, kd) is None
  assert gla_perdim_kernels_mosaic_gpu.fused_unsupported(128, 128) is None
  assert "shared memory" in gla_perdim_kernels_mosaic_gpu.fused_unsupported(128, 256)
  assert "power of two" in gla_perdim_kernels_mosaic_gpu.fused_unsupported(192, 64)


# ---------------------------------------------------------------------------------------------
# Gradients


def _check_gradients(x, seed, *, chunk=CHUNK, seg=None, tol=BF16):
  """Output, final state and dq, dk, dv, dg, ds0 of `fused_gla_perdim` (padded by `run_padded`)
  against `jax.vjp` of the float32 scan with the same cotangents; every gradient in its input's
  dtype (dg in g's)."""
  scale = x["q"].shape[-1] ** -0.5

  def reference(q, k, v, g, s0):
    return gla_scan(q, k, v, g, scale=scale, s0=s0, segment_ids=seg)

  def op(q, k, v, g, s0):
    fused = lambda *a: gla_perdim_kernels_mosaic_gpu.fused_gla_perdim(scale, chunk, True, *a)
    return run_padded(fused, q, k, v, (g,), s0=s0, segment_ids=seg, chunk_size=chunk)

  f32 = as_f32(x)
  (ref_o, ref_s), ref_vjp = jax.vjp(reference, *(f32[n] for n in NAMES))
  cts = random_cotangents(seed, ref_o, ref_s)
  ref_d = ref_vjp(cts)
  (o, s), vjp = jax.vjp(op, *(x[n] for n in NAMES))
  d = vjp((cts[0].astype(o.dtype), cts[1]))
  assert o.dtype == x["v"].dtype and s.dtype == jnp.float32
  assert_rel_close("o", ref_o, o, tol)
  assert_rel_close("final state", ref_s, s, tol)
  for name, got, want in zip(NAMES, d, ref_d):
    assert got.dtype == x[name].dtype, name
    assert_rel_close(f"d{name}", want, got, tol)


@pytest.mark.parametrize("t, kd, vd, decay", [(150, 64, 128, "normal"), (128, 128, 64, "weak"),
                                              (128, 64, 64, "strong"), (128, 128, 64, "mixed")],
                         ids=["T150-K64-V128", "T128-K128-V64-weak", "T128-K64-strong", "T128-K128-mixed"])
def test_gradients_match_scan(t, kd, vd, decay):
  """T 150 pads the last chunk, V 128 has two value blocks, K 128 two key-block programs; the weak
  decay keeps every cross-chunk term of the gradients (lambda <H, S> in dg included), the strong
  one (g about -20 a step) leaves little but the diagonals and must stay finite, the mixed one
  both at once."""
  seed = zlib.crc32(f"perdim-grad-{t}-{kd}-{vd}-{decay}".encode())
  _check_gradients(_inputs(seed, t=t, kd=kd, vd=vd, decay=decay), seed)


def test_gradients_chunk_128_match_scan():
  """Chunk 128 (T 200 pads to two chunks): seven levels in `chunk_grads` too."""
  _check_gradients(_inputs(23, t=200, h=1, kd=64, vd=64, decay="weak"), 23, chunk=128)


def test_two_buffer_slots_match_scan(monkeypatch):
  """CHUNK_PARALLEL_SLOTS = 2 (the default is 1): the scores and chunk-gradient walks over two key /
  value blocks with the next block's copies in flight while this one is read."""
  monkeypatch.setattr(gla_perdim_kernels_mosaic_gpu, "CHUNK_PARALLEL_SLOTS", 2)
  slots = []
  scratch_within = gla_perdim_kernels_mosaic_gpu.scratch_within

  def counting_slots(what, *layout, **kw):
    scratch = scratch_within(what, *layout, **kw)
    slots.append((what.rsplit(" ", 1)[-1], scratch[0].shape[0]))
    return scratch
  monkeypatch.setattr(gla_perdim_kernels_mosaic_gpu, "scratch_within", counting_slots)
  _check_gradients(_inputs(31, t=128, kd=128, vd=128, decay="mixed"), 31)
  assert ("scores", 2) in slots and ("backward", 2) in slots and ("forward", 2) in slots, slots


def test_gradients_float16_match_scan():
  """float16 inputs: 16-bit operands in float16, the scores gradient's in bf16 (float16 holds b only
  to -65504). The bf16 tolerance (float16 rounds finer)."""
  _check_gradients(_inputs(29, t=128, h=1, kd=64, vd=64, dtype=jnp.float16), 29)


# ---------------------------------------------------------------------------------------------
# Segment ids (packed sequences)


def _segments(t, starts_per_row):
  """[B, T] int32 ids that change at each row's `starts`."""
  return jnp.stack([jnp.cumsum(jnp.zeros(t, jnp.int32).at[jnp.asarray(starts)].set(1)) for starts in starts_per_row])


# Row 0: a boundary inside chunk 0, one exactly at chunk 1's first token (its entering state feeds
# none of it) and two inside chunk 1 (a middle segment touching neither end). Row 1: chunk 0's last
# token starts a segment (d of one token), which chunk 1 continues, and chunk 2's last token starts one.
SEG_STARTS = ([20, 64, 90, 110], [63, 130, 191])


def test_forward_segments_match_scan():
  """`forward` with segment ids: O and the final state against the float32 scan with the same ids
  (weak decay: a strong one would hide what crosses the chunks), a nonzero initial state."""
  t = 3 * CHUNK
  x = _inputs(31, b=2, t=t, kd=64, vd=64, decay="weak")
  seg = _segments(t, SEG_STARTS)
  f32 = as_f32(x)
  ref_o, ref_s = gla_scan(f32["q"], f32["k"], f32["v"], f32["g"], scale=64 ** -0.5, s0=f32["s0"], segment_ids=seg)
  o, s, _ = _forward(x, False, seg=seg)
  assert_rel_close("o", ref_o, o, BF16)
  assert_rel_close("final state", _flat_heads(ref_s), s, BF16)


@pytest.mark.parametrize("t, kd, decay", [(192, 64, "weak"), (150, 128, "normal")],
                         ids=["T192-K64-weak", "T150-K128"])
def test_gradients_segments_match_scan(t, kd, decay):
  """Every gradient with segment ids against the scan with the same ids; T 150 pads the last chunk
  (its ids repeat the last one), K 128 has two key blocks."""
  seed = zlib.crc32(f"perdim-seg-grad-{t}-{kd}-{decay}".encode())
  x = _inputs(seed, b=2, t=t, kd=kd, vd=64, decay=decay)
  seg = _segments(t, [[s for s in starts if s < t] for starts in SEG_STARTS])
  _check_gradients(x, seed, seg=seg)


# ---------------------------------------------------------------------------------------------
# Lowering


@pytest.mark.parametrize("kd, vd, chunk, segments", [(64, 128, 64, False), (128, 64, 64, True),
                                                     (128, 128, 128, True), (256, 64, 64, False)],
                         ids=["K64-V128", "K128-V64-seg", "K128-V128-C128-seg", "K256-V64"])
def test_lowers_for_cuda(kd, vd, chunk, segments):
  """Interpret mode checks neither layouts nor wgmma operand rules; the Mosaic GPU lowering does.
  Its rule registers only with a GPU plugin, so the test imports the registration itself. The
  forward alone (no stored states): the scores and the walk; forward and backward: those and the
  reverse walk and `chunk_grads`."""
  import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401, PLC0415

  b, t, h = 2, 2 * chunk, 2
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)

  def loss(q, k, v, g, s0, seg):
    o, s = gla_perdim_kernels_mosaic_gpu.fused_gla_perdim(kd ** -0.5, chunk, False, q, k, v, g, s0, seg)
    return o.astype(jnp.float32).sum() + s.sum()

  args = (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h, kd),
          spec(b, h, kd, vd, dt=jnp.float32), spec(b, t, dt=jnp.int32) if segments else None)
  assert export.export(jax.jit(loss), platforms=["cuda"])(*args).mlir_module().count("mosaic_gpu_v2") == 2
  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
  assert export.export(jax.jit(grad), platforms=["cuda"])(*args).mlir_module().count("mosaic_gpu_v2") == 4
