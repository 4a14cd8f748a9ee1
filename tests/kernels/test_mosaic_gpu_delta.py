"""The fused Mosaic GPU delta-rule kernels (`delta_kernels_mosaic_gpu`, gated by a scalar decay or
not) against the float32 scan under Mosaic GPU interpret mode: the forward's outputs, final state
and stored states entering every chunk; forward and every gradient of `delta_rule(impl="pallas")`,
which takes them under PALLAS_KERNELS_INTERPRET=mosaic_gpu; both with segment ids too; their
lowering to the Mosaic GPU custom call for CUDA. Under PRESOLVE (the module's default:
`delta_kernels_mosaic_gpu.presolve` solves T chunk-parallel, the walks read it) unless a case is
marked in-walk (PRESOLVE off: every walk program solves T itself). The lowering needs jax >= 0.11 (older jax has no Mosaic GPU interpret mode, which
`supports` asks for), interpret mode on the CPU jax >= 0.12 (jax 0.11.2 fails there: no
`eval_jaxpr` rule, no CPU rule for wgmma)."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallas_kernels as pk
from pallas_kernels.common import delta_kernels_mosaic_gpu, state_pass_mosaic_gpu
from pallas_kernels.ops.delta_rule.scan import delta_rule_scan
from tests.conftest import assert_rel_close
from tests.kernels.recurrence_cases import kernel_names, make_inputs
from tests.kernels.test_chunk_agreement import TOL, check_against_reference
from tests.kernels.test_mosaic_gpu_fused import SEG_STARTS, _segments

pytestmark = pytest.mark.skipif(
    state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64) is not None,
    reason=str(state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64)))
interpret_mode = pytest.mark.skipif(
    jax.__version_info__ < (0, 12), reason=f"Mosaic GPU interpret mode fails on the CPU with jax {jax.__version__}")

BF16 = TOL[jnp.bfloat16]
CHUNK = 64
BOTH_SOLVES = pytest.mark.parametrize("presolve", [False, True], ids=["in-walk", "presolve"], indirect=True)


DEFAULT_PRESOLVE = delta_kernels_mosaic_gpu.PRESOLVE


@pytest.fixture
def presolve(request, monkeypatch):
  """Sets `delta_kernels_mosaic_gpu.PRESOLVE` (the module's default unless parametrized,
  `BOTH_SOLVES`) for one test. The kernels read it while tracing, and it is no part of jax's cache
  keys: a test moving it off the default clears the caches around itself, as
  tests/kernels/test_fused_kernels.py's `kernel_flags` (only then: the other tests share the
  reference's compiled scans)."""
  value = getattr(request, "param", DEFAULT_PRESOLVE)
  monkeypatch.setattr(delta_kernels_mosaic_gpu, "PRESOLVE", value)
  if value != DEFAULT_PRESOLVE:
    jax.clear_caches()
  yield value
  if value != DEFAULT_PRESOLVE:
    jax.clear_caches()


def _flat_heads(x_BHKV):
  b, h = x_BHKV.shape[:2]
  return x_BHKV.reshape(b * h, *x_BHKV.shape[2:])


def _scan_by_chunks(x, chunk, seg=None):
  """The float32 scan run chunk after chunk: O [B, T, H, V], the state entering every chunk
  [B*H, N, K, V] and the final state [B*H, K, V]; seg: [B, T] segment ids or None."""
  f32 = {name: a.astype(jnp.float32) for name, a in x.items()}
  scale = x["q"].shape[-1] ** -0.5
  s_BHKV, o_chunks, states = f32["s0"], [], []
  for start in range(0, x["q"].shape[1], chunk):
    part = {name: f32[name][:, start:start + chunk] for name in ("q", "k", "v", "beta", "g") if name in f32}
    states.append(_flat_heads(s_BHKV))
    if seg is not None and start:
      # A segment starting at the chunk's first token reads no state: the scan's reset there, which
      # the part's own ids cannot show (the stored state entering the chunk is the one before it).
      s_BHKV = s_BHKV * (seg[:, start] == seg[:, start - 1])[:, None, None, None]
    o, s_BHKV = delta_rule_scan(part["q"], part["k"], part["v"], part["beta"], part.get("g"), scale=scale,
                                s0=s_BHKV, segment_ids=None if seg is None else seg[:, start:start + chunk])
    o_chunks.append(o)
  return jnp.concatenate(o_chunks, axis=1), jnp.stack(states, axis=1), _flat_heads(s_BHKV)


def _forward(x, store_states, chunk=CHUNK, seg=None):
  return delta_kernels_mosaic_gpu.forward(
      x["q"], x["k"], x["v"], x["beta"], x.get("g"), _flat_heads(x["s0"]), scale=x["q"].shape[-1] ** -0.5,
      chunk=chunk, store_states=store_states, interpret=True, seg=seg)


def _check_against_scan(x, store_states=True, chunk=CHUNK, seg=None):
  ref_o, ref_states, ref_s = _scan_by_chunks(x, chunk, seg)
  o, s, residuals = _forward(x, store_states, chunk, seg)
  assert o.dtype == x["v"].dtype and s.dtype == jnp.float32
  assert_rel_close("o", ref_o, o, BF16)
  assert_rel_close("final state", ref_s, s, BF16)
  if store_states:
    assert residuals.states.dtype == x["q"].dtype and residuals.states.shape == ref_states.shape
    assert_rel_close("states entering the chunks", ref_states, residuals.states, BF16)
    assert residuals.x_hi.shape == residuals.x_lo.shape == x["v"].shape
  else:
    assert residuals is None


@interpret_mode
@pytest.mark.parametrize("store_states, presolve", [(True, False), (False, False), (True, True)],
                         ids=["states", "no-states", "states-presolve"], indirect=["presolve"])
@pytest.mark.parametrize("kd, vd", [(64, 128), (128, 64)], ids=["K64-V128", "K128-V64"])
@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_forward_matches_scan(variant, kd, vd, store_states, presolve):
  """Three chunks, two heads, two value blocks at V 128 (each solves the chunk's T itself, or
  reads `presolve`'s), a nonzero initial state, beta in (0, 1), normalised keys."""
  seed = zlib.crc32(f"mosaic-delta-{variant}-{kd}-{vd}-{store_states}".encode())
  _check_against_scan(make_inputs(seed, variant, b=1, t=3 * CHUNK, h=2, kd=kd, vd=vd, dtype=jnp.bfloat16),
                      store_states)


@interpret_mode
@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_forward_two_batch_rows(variant):
  """The kernel splits its flat batch*head program index."""
  _check_against_scan(make_inputs(zlib.crc32(f"mosaic-delta-b2-{variant}".encode()), variant, b=2, t=2 * CHUNK,
                                  h=2, kd=64, vd=64, dtype=jnp.bfloat16))


def _correlated_keys(x, seed):
  """x with keys sharing one direction, k = normalise(randn + 3 u), and beta in (0.9, 1)."""
  rng = np.random.default_rng(seed)
  k = rng.standard_normal(x["k"].shape) + 3.0 * rng.standard_normal(x["k"].shape[-1])
  x["k"] = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), x["k"].dtype)
  x["beta"] = jnp.asarray(0.9 + 0.1 * rng.random(x["beta"].shape), x["beta"].dtype)
  return x


@BOTH_SOLVES
@interpret_mode
@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_forward_correlated_keys(variant, presolve):
  """Keys sharing one direction (k = normalise(randn + 3 u)), beta near 1, no decay or a weak one
  (g = 0.1 logsigmoid(randn), so that A's far blocks still count): (I + A)^-1 is far from I and
  A's powers grow far past it, the case where a solve by the nilpotent product
  (I - A)(I + A^2)(I + A^4)... cancels catastrophically even in float32."""
  _check_against_scan(_correlated_keys(make_inputs(9, variant, b=1, t=2 * CHUNK, h=2, kd=64, vd=64,
                                                   dtype=jnp.bfloat16, gate_scale=0.1), 9))


@BOTH_SOLVES
@interpret_mode
@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_forward_chunk_128(variant, presolve):
  """Six levels of the solve's doubling and two wgmma row groups per [C, *] product; a weak decay
  (g = 0.1 logsigmoid(randn)) leaves A's far blocks in play."""
  _check_against_scan(make_inputs(zlib.crc32(f"mosaic-delta-c128-{variant}".encode()), variant, b=1,
                                  t=4 * CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16, gate_scale=0.1),
                      chunk=2 * CHUNK)


@BOTH_SOLVES
@interpret_mode
def test_delta_forward_strong_decay(presolve):
  """g around -10 a token: the in-chunk decays underflow exp's float32 range, and exp(b_i - b_j)
  above the diagonal would overflow if it were not masked in the exponent."""
  _check_against_scan(make_inputs(5, "gated_delta", b=1, t=2 * CHUNK, h=2, kd=64, vd=64, dtype=jnp.bfloat16,
                                  gate_scale=10.0))


@interpret_mode
@pytest.mark.parametrize("kd, vd, store_states, presolve",
                         [(64, 128, True, False), (128, 64, False, False), (128, 64, False, True)],
                         ids=["K64-V128-states", "K128-V64-no-states", "K128-V64-no-states-presolve"],
                         indirect=["presolve"])
@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_forward_segments_match_scan(variant, kd, vd, store_states, presolve):
  """`forward` with segment ids (`SEG_STARTS`: boundaries inside a chunk and at a chunk's first
  token, a chunk of three segments none of which the entering state feeds, segments starting at a
  chunk's last token) against the float32 scan with the same ids, the stored states entering the
  chunks included; a weak decay (a strong one would hide what crosses the chunks) and a nonzero
  initial state, which feeds the first segment only."""
  t = 3 * CHUNK
  x = make_inputs(zlib.crc32(f"mosaic-delta-seg-{variant}-{kd}".encode()), variant, b=2, t=t, h=2, kd=kd, vd=vd,
                  dtype=jnp.bfloat16, gate_scale=0.02)
  _check_against_scan(x, store_states, seg=_segments(t, SEG_STARTS))


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
  with pytest.raises(ValueError, match=r"q and v \(or do\) must share one dtype"):
    _forward(x, False)
  x = make_inputs(1, "gated_delta", b=1, t=2 * CHUNK, h=1, kd=128, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="KiB of shared memory per block"):
    _forward(x, False, chunk=2 * CHUNK)
  x = make_inputs(1, "delta", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"segment ids must be \[B, T\]"):
    _forward(x, False, seg=jnp.zeros((1, CHUNK, 1), jnp.int32))


@BOTH_SOLVES
@pytest.mark.parametrize("kd, vd, gated, store_states, chunk",
                         [(64, 128, True, True, CHUNK), (128, 64, False, True, CHUNK), (128, 128, True, False, CHUNK),
                          (256, 64, True, True, CHUNK), (64, 64, True, True, 2 * CHUNK)],
                         ids=["K64-V128-g-states", "K128-V64-nodecay-states", "K128-V128-g", "K256-V64-g-states",
                              "C128-K64-V64-g-states"])
def test_delta_forward_lowers_for_cuda(kd, vd, gated, store_states, chunk, presolve):
  """Interpret mode checks neither layouts, wgmma operand rules nor shared-memory size; the Mosaic
  GPU lowering does. Its rule registers only with a GPU plugin, so the test imports the
  registration itself. K 256 and chunk 128 leave room for one buffer slot only. PRESOLVE adds the
  `presolve` kernel."""
  import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401, PLC0415

  b, t, h = 2, 4 * CHUNK, 2
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  args = (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h, dt=jnp.float32),
          spec(b, t, h, dt=jnp.float32) if gated else None, spec(b * h, kd, vd, dt=jnp.float32))

  def f(q, k, v, beta, g, s0):
    return delta_kernels_mosaic_gpu.forward(q, k, v, beta, g, s0, scale=kd ** -0.5, chunk=chunk,
                                            store_states=store_states)

  exported = export.export(jax.jit(f), platforms=["cuda"])(*args)
  assert exported.mlir_module().count("mosaic_gpu_v2") == 1 + presolve


# ---------------------------------------------------------------------------------------------
# Backward, through `delta_rule(impl="pallas")`


@interpret_mode
@pytest.mark.parametrize("t, kd, vd, presolve",
                         [(128, 64, 64, False), (150, 64, 128, False), (100, 128, 64, False), (150, 64, 128, True)],
                         ids=["T128-K64-V64", "T150-K64-V128", "T100-K128-V64", "T150-K64-V128-presolve"],
                         indirect=["presolve"])
@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_gradients_match_scan(variant, t, kd, vd, presolve):
  """`delta_rule(impl="pallas")` on the Mosaic GPU kernels: output, final state and dq, dk, dv,
  dbeta, dg, ds0 against the float32 scan, with a nonzero initial state; T 150 and 100 pad the last
  chunk (beta 0 there), V 128 has two value blocks, K 128 two key blocks (whose shares of dbeta
  and dg add up)."""
  seed = zlib.crc32(f"mosaic-delta-grad-{variant}-{t}-{kd}-{vd}".encode())
  inputs = make_inputs(seed, variant, b=1, t=t, h=2, kd=kd, vd=vd, dtype=jnp.bfloat16)
  check_against_reference(variant, inputs, BF16, (CHUNK,), seed, impl="pallas:mosaic_gpu")


@BOTH_SOLVES
@interpret_mode
@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_gradients_correlated_keys(variant, presolve):
  """Correlated keys (`_correlated_keys`) with a weak decay or none: T = (I + A)^-1 far from I,
  and dbeta's terms rowsum(R * (V - e * (K S))) and rowsum(dA * (K K^T) * Gamma) cancel down to
  rowsum(R * X) / beta (X in bf16 alone for dA = -R X^T: 7.9e-3 of the scan's dbeta in a jnp
  prototype, hi + lo 4.0e-3)."""
  inputs = _correlated_keys(make_inputs(13, variant, b=1, t=3 * CHUNK, h=2, kd=64, vd=64, dtype=jnp.bfloat16,
                                        gate_scale=0.1), 13)
  check_against_reference(variant, inputs, BF16, (CHUNK,), 13, impl="pallas:mosaic_gpu")


@interpret_mode
def test_delta_gradients_weak_decay():
  """g around -0.02 a token: lambda and d stay near one, so the state and its gradient carry
  across chunks (at g around -1, lambda = exp(b_C) is about e^-50 per chunk, and every cross-chunk
  term of the gradients, lambda H and lambda <H, S> in dg included, vanishes below the tolerance)."""
  inputs = make_inputs(11, "gated_delta", b=1, t=150, h=2, kd=128, vd=64, dtype=jnp.bfloat16, gate_scale=0.02)
  check_against_reference("gated_delta", inputs, BF16, (CHUNK,), 11, impl="pallas:mosaic_gpu")


@interpret_mode
def test_delta_gradients_strong_decay():
  """g around -10 a token: Gamma^T of the reverse pass (P^T and A^T) masked in the exponent as
  the forward's Gamma."""
  inputs = make_inputs(9, "gated_delta", b=1, t=2 * CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16, gate_scale=10.0)
  check_against_reference("gated_delta", inputs, BF16, (CHUNK,), 9, impl="pallas:mosaic_gpu")



@BOTH_SOLVES
@interpret_mode
def test_pallas_delta_rule_routes_to_the_fused_kernels(monkeypatch, presolve):
  """Gated or not, with or without segment ids: the fused kernels, forward and backward (under
  PRESOLVE `presolve` first); K 128 at chunk 128 (over the shared memory of a block) or
  PALLAS_KERNELS_FUSED=0 keep the state-pass kernels."""
  monkeypatch.setenv("PALLAS_KERNELS_INTERPRET", "mosaic_gpu")
  monkeypatch.delenv("PALLAS_KERNELS_FUSED", raising=False)
  x = make_inputs(3, "gated_delta", b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=jnp.bfloat16)
  seg = jnp.zeros((1, CHUNK), jnp.int32)

  def names(g, segment_ids=None, x=x, chunk_size=CHUNK):
    loss = lambda q: pk.delta_rule(q, x["k"], x["v"], x["beta"], g=g, segment_ids=segment_ids, impl="pallas",
                                   chunk_size=chunk_size)[0].astype(jnp.float32).sum()
    return kernel_names(jax.grad(loss), x["q"])

  fused = ["_presolve_body"] * presolve + ["_forward_body", "_state_grad_body", "_chunk_grad_body"]
  assert names(x["g"]) == fused
  assert names(None) == fused
  assert names(x["g"], seg) == fused
  assert names(None, seg) == fused
  wide = make_inputs(3, "gated_delta", b=1, t=2 * CHUNK, h=1, kd=128, vd=64, dtype=jnp.bfloat16)
  assert delta_kernels_mosaic_gpu.fused_unsupported(jnp.bfloat16, 2 * CHUNK, 128, True) is not None
  assert "_chunk_grad_body" not in names(wide["g"], x=wide, chunk_size=2 * CHUNK)
  assert "_chunk_grad_body" not in names(wide["g"], jnp.zeros((1, 2 * CHUNK), jnp.int32), x=wide, chunk_size=2 * CHUNK)
  monkeypatch.setenv("PALLAS_KERNELS_FUSED", "0")
  assert "_chunk_grad_body" not in names(x["g"])


def test_delta_backward_refusals():
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)

  def backward(kd, chunk, dt=jnp.bfloat16):
    n = 256 // chunk
    residuals = delta_kernels_mosaic_gpu.Residuals(spec(1, n, kd, 64, dt=dt), spec(1, 256, 1, 64, dt=dt),
                                                   spec(1, 256, 1, 64, dt=dt))
    args = (spec(1, 256, 1, kd, dt=dt), spec(1, 256, 1, kd, dt=dt), spec(1, 256, 1, 64, dt=dt),
            spec(1, 256, 1, dt=jnp.float32), spec(1, 256, 1, dt=jnp.float32), residuals, spec(1, 256, 1, 64, dt=dt),
            spec(1, kd, 64, dt=jnp.float32))
    f = lambda *a: delta_kernels_mosaic_gpu.backward(*a, scale=0.1, chunk=chunk, interpret=True)
    return jax.eval_shape(f, *args)

  assert backward(64, 64)[3].shape == backward(64, 64)[4].shape == (1, 256, 1)
  with pytest.raises(ValueError, match="backward: wgmma takes float32 only as TF32"):
    backward(64, 64, dt=jnp.float32)
  with pytest.raises(ValueError, match="backward: .* KiB of shared memory per block"):
    backward(256, 128)


@BOTH_SOLVES
@pytest.mark.parametrize("kd, vd, gated, chunk", [(64, 128, True, CHUNK), (128, 64, False, CHUNK),
                                                  (256, 64, True, CHUNK), (64, 64, True, 2 * CHUNK)],
                         ids=["K64-V128-g", "K128-V64-nodecay", "K256-V64-g", "C128-K64-V64-g"])
def test_delta_backward_lowers_for_cuda(kd, vd, gated, chunk, presolve):
  """The forward (storing its residuals) and both backward kernels through the Mosaic GPU
  lowering (layout inference and the shared-memory limit included), as
  `test_delta_forward_lowers_for_cuda`; K 256 and chunk 128 are the tightest in shared memory."""
  import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401, PLC0415

  b, t, h = 2, 4 * CHUNK, 2
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  g = spec(b, t, h, dt=jnp.float32) if gated else None

  def loss(q, k, v, beta, g, s0):
    o, s = delta_kernels_mosaic_gpu.fused_delta_rule(kd ** -0.5, chunk, False, q, k, v, beta, g, s0)
    return o.astype(jnp.float32).sum() + s.sum()

  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5) if gated else (0, 1, 2, 3, 5))
  exported = export.export(jax.jit(grad), platforms=["cuda"])(
      spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h, dt=jnp.float32), g,
      spec(b, h, kd, vd, dt=jnp.float32))
  assert exported.mlir_module().count("mosaic_gpu_v2") == 3 + presolve


# ---------------------------------------------------------------------------------------------
# Segment ids (packed sequences), forward and backward


@interpret_mode
@pytest.mark.parametrize("t, kd, vd, gate_scale, recurring, presolve",
                         [(150, 64, 128, 1.0, False, False), (192, 128, 64, 0.02, True, False),
                          (192, 128, 64, 0.02, True, True)],
                         ids=["T150-K64-V128", "T192-K128-V64-weak-recurring", "T192-K128-V64-weak-recurring-presolve"],
                         indirect=["presolve"])
@pytest.mark.parametrize("variant", ["gated_delta", "delta"])
def test_delta_gradients_segments_match_scan(variant, t, kd, vd, gate_scale, recurring, presolve):
  """`delta_rule(impl="pallas", segment_ids=...)` on the Mosaic GPU kernels: output, final state
  and dq, dk, dv, dbeta, dg, ds0 against the float32 scan with the same ids (`SEG_STARTS`), a
  nonzero initial state; T 150 pads the last chunk (its ids repeat the last one), the weak decay
  keeps the state and its gradient across chunks, K 128 has two key blocks, V 128 two value
  blocks. `recurring`: the ids alternate 5, 7, 5, ..., so an id comes back after another one and
  starts a new segment (the op's `chunking.segment_runs`)."""
  seed = zlib.crc32(f"mosaic-delta-seg-grad-{variant}-{t}-{kd}".encode())
  inputs = make_inputs(seed, variant, b=2, t=t, h=2, kd=kd, vd=vd, dtype=jnp.bfloat16, gate_scale=gate_scale)
  seg = _segments(t, [[s for s in starts if s < t] for starts in SEG_STARTS])
  if recurring:
    seg = 5 + 2 * (seg % 2)
  check_against_reference(variant, inputs, BF16, (CHUNK,), seed, segment_ids=seg, impl="pallas:mosaic_gpu")


@pytest.mark.parametrize("kd, vd, gated, chunk, presolve",
                         [(64, 128, True, CHUNK, False), (128, 64, False, CHUNK, False), (256, 64, True, CHUNK, False),
                          (64, 64, True, 2 * CHUNK, False), (64, 64, False, 2 * CHUNK, False),
                          (256, 64, True, CHUNK, True)],
                         ids=["K64-V128-g", "K128-V64-nodecay", "K256-V64-g", "C128-K64-V64-g", "C128-K64-V64-nodecay",
                              "K256-V64-g-presolve"], indirect=["presolve"])
def test_delta_segments_lower_for_cuda(kd, vd, gated, chunk, presolve):
  """The forward and both backward kernels with segment ids through the Mosaic GPU lowering, as
  `test_delta_backward_lowers_for_cuda`: K 256 and chunk 128 the tightest in shared memory with the
  segment counts' buffers (and, ungated, the e * dO tile) on top."""
  import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401, PLC0415

  b, t, h = 2, 4 * CHUNK, 2
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  g = spec(b, t, h, dt=jnp.float32) if gated else None

  def loss(q, k, v, beta, g, s0, seg):
    o, s = delta_kernels_mosaic_gpu.fused_delta_rule(kd ** -0.5, chunk, False, q, k, v, beta, g, s0, seg)
    return o.astype(jnp.float32).sum() + s.sum()

  args = (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h, dt=jnp.float32), g,
          spec(b, h, kd, vd, dt=jnp.float32), spec(b, t, dt=jnp.int32))
  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5) if gated else (0, 1, 2, 3, 5))
  assert export.export(jax.jit(grad), platforms=["cuda"])(*args).mlir_module().count("mosaic_gpu_v2") == 3 + presolve
  # The forward alone: no stored states.
  assert export.export(jax.jit(loss), platforms=["cuda"])(*args).mlir_module().count("mosaic_gpu_v2") == 1 + presolve


# ---------------------------------------------------------------------------------------------
# The Hopper default (dispatch.MOSAIC_GPU_FASTER)


def test_hopper_default_takes_the_mosaic_gpu_delta_rule(monkeypatch):
  """On a (pretended) H100 under PALLAS_KERNELS_GPU=auto, `delta_rule(impl="pallas")` in bf16,
  gated or not, with segment ids or not, traces the presolve and the fused Mosaic GPU walks forward
  and backward; =triton and float16 keep the Triton kernels."""
  from pallas_kernels import _compat, dispatch
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(dispatch, "_hopper", lambda: True)
  monkeypatch.setattr(_compat, "has_triton_backend", lambda: True)
  monkeypatch.delenv("PALLAS_KERNELS_GPU", raising=False)
  monkeypatch.delenv("PALLAS_KERNELS_FUSED", raising=False)
  seg = jnp.repeat(jnp.arange(2, dtype=jnp.int32), CHUNK // 2)[None]

  def names(variant, dtype=jnp.bfloat16, segment_ids=None):
    x = make_inputs(5, variant, b=1, t=CHUNK, h=1, kd=64, vd=64, dtype=dtype)
    loss = lambda q: pk.delta_rule(q, x["k"], x["v"], x["beta"], g=x.get("g"), impl="pallas",
                                   segment_ids=segment_ids)[0].astype(jnp.float32).sum()
    return kernel_names(jax.grad(loss), x["q"])

  for variant in ("delta", "gated_delta"):
    for segment_ids in (None, seg):
      mosaic = names(variant, segment_ids=segment_ids)
      assert mosaic[:2] == ["_presolve_body", "_forward_body"], mosaic
      assert "_state_grad_body" in mosaic and "_chunk_grad_body" in mosaic and "_wy_kernel" not in mosaic
  assert "_forward_body" not in names("delta", jnp.float16) and "_wy_kernel" in names("delta", jnp.float16)
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "triton")
  assert "_forward_body" not in names("delta") and "_wy_kernel" in names("delta")
