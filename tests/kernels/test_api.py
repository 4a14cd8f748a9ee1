"""The op contract: argument validation, impl dispatch, jit, and the chunk path's memory."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.dispatch import check_pallas_shapes, resolve_impl
from tests.conftest import assert_rel_close
from tests.kernels.recurrence_cases import make_inputs

B, T, H, K, V = 2, 10, 3, 8, 12


def arrays(*shapes, dtype=jnp.float32):
  return [jnp.ones(s, dtype) for s in shapes]


q, k, v = arrays((B, T, H, K), (B, T, H, K), (B, T, H, V))
beta = jnp.full((B, T, H), 0.5)


@pytest.mark.parametrize("call, match", [
    (lambda: pk.gla(q[0], k, v), r"q: expected rank 4"),
    (lambda: pk.gla(q, k[:, :5], v), r"k: expected the shape of q"),
    (lambda: pk.gla(q, k[..., :4], v), r"k: expected the shape of q"),
    (lambda: pk.gla(q, k, v[:1]), r"v: expected leading dims"),
    (lambda: pk.gla(q, k, v[:, :, :2]), r"v: expected leading dims"),
    (lambda: pk.gla(q, k, v, jnp.zeros((B, T, H, K + 1))), r"g: expected None, shape"),
    (lambda: pk.gla(q, k, v, jnp.zeros((B, T))), r"g: expected None, shape"),
    (lambda: pk.gla(q, k, v, impl="fast"), r"impl: expected one of"),
    (lambda: pk.gla(q, k, v, initial_state=jnp.zeros((B, H, V, K))), r"initial_state: expected shape"),
    (lambda: pk.gla(q, k, v, segment_ids=jnp.zeros((B, T + 1), jnp.int32)), r"segment_ids: expected shape"),
    (lambda: pk.gla(q, k, v, segment_ids=jnp.zeros((B, T))), r"segment_ids: expected an integer dtype"),
    (lambda: pk.gla(q, k, v, chunk_size=24), r"chunk_size: expected"),
    (lambda: pk.gla(q, k, v, chunk_size=0), r"chunk_size: expected a positive int"),
    (lambda: pk.gla(q.astype(jnp.int32), k, v), r"q: expected a floating dtype"),
    (lambda: pk.gla(q, k.astype(jnp.bfloat16), v), r"q, k, v: expected one dtype"),
    (lambda: pk.delta_rule(q, k, v, beta[..., :1]), r"beta: expected shape"),
    (lambda: pk.delta_rule(q, k, v, None), r"beta: expected an array"),
    (lambda: pk.delta_rule(q, k, v, beta, g=jnp.zeros((B, T, H, K))), r"g: expected shape"),
    (lambda: pk.gla_step(q[:, 0], k[:, 0], v[:, 0], None, jnp.zeros((B, H, K, K))), r"state: expected shape"),
    (lambda: pk.gla_step(q, k, v, None, jnp.zeros((B, H, K, V))), r"q: expected rank 3"),
    (lambda: pk.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta, jnp.zeros((B, H, K, V))), r"beta: expected shape"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("kd, vd, chunk, name", [(24, 64, 64, "K"), (64, 8, 64, "V"), (64, 64, 48, "chunk_size")])
def test_gpu_kernel_shape_limits_are_clear_errors(kd, vd, chunk, name):
  check_pallas_shapes("triton", 64, 64, 64)  # the benchmark shapes pass
  with pytest.raises(ValueError, match=rf"{name}.*power of two >= 16, got"):
    check_pallas_shapes("triton", kd, vd, chunk)


def test_error_message_shows_the_shapes():
  with pytest.raises(ValueError) as err:
    pk.gla(q, k[:, :5], v)
  assert str((B, T, H, K)) in str(err.value) and str((B, 5, H, K)) in str(err.value)


def test_auto_resolves_to_chunk_on_cpu():
  assert jax.default_backend() == "cpu"
  assert resolve_impl("auto", ("scan", "chunk")) == "chunk"
  assert resolve_impl("auto", ("scan", "chunk", "pallas")) == "chunk"
  inputs = make_inputs(1, "gla_perdim", t=20)
  auto = pk.gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], impl="auto")[0]
  scan = pk.gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], impl="scan")[0]
  assert_rel_close("auto vs scan", scan, auto, 1e-4)


def test_auto_takes_the_fused_kernels_on_gpu_where_they_apply(monkeypatch):
  from pallas_kernels import dispatch

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(dispatch, "_hopper", lambda: True)
  monkeypatch.delenv("PALLAS_KERNELS_GPU", raising=False)
  monkeypatch.delenv("PALLAS_KERNELS_FUSED", raising=False)
  forms = ("scan", "chunk", "pallas")
  auto = lambda op, kd=128, vd=128, chunk=64, **kw: resolve_impl(
      "auto", forms, op=op, dtype=jnp.bfloat16, kd=kd, vd=vd, chunk_size=chunk, **kw)
  for op in ("delta_rule", "gated_delta_rule", "gla"):
    assert auto(op) == "pallas", op
  assert auto("gla", kd=64, vd=2048) == "pallas"               # the Rodimus shape
  assert auto("gla_perdim") == "pallas"                          # per-dimension GLA
  assert auto(None) == "chunk"                                   # an op without fused kernels
  assert auto("delta_rule", kd=96) == "chunk"                    # Triton tiles need powers of two
  assert auto("delta_rule", chunk=48) == "chunk"
  assert resolve_impl("auto", ("scan", "chunk"), op="delta_rule", dtype=jnp.bfloat16, kd=128, vd=128,
                      chunk_size=64) == "chunk"                  # an op without a Pallas form
  monkeypatch.setenv("PALLAS_KERNELS_FUSED", "0")                # state-pass path: chunk under auto
  assert auto("delta_rule") == "chunk"
  monkeypatch.setenv("PALLAS_KERNELS_FUSED", "auto")
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "mosaic_gpu")         # Mosaic GPU state-pass kernels
  monkeypatch.setattr(dispatch, "_mosaic_gpu_unsupported", lambda *_: None)
  assert auto("delta_rule") == "chunk"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert auto("delta_rule") == "chunk"


def test_final_state_only_when_asked():
  o, s = pk.delta_rule(q, k, v, beta, impl="chunk")
  assert s is None and o.shape == (B, T, H, V)


def test_custom_scale_is_used():
  inputs = make_inputs(2, "delta", t=12)
  args = (inputs["q"], inputs["k"], inputs["v"], inputs["beta"])
  o1 = pk.delta_rule(*args, scale=1.0, impl="chunk")[0]
  o2 = pk.delta_rule(*args, scale=0.5, impl="chunk")[0]
  assert_rel_close("scale is linear in o", o1 * 0.5, o2, 1e-5)


@pytest.mark.parametrize("op", ["delta_rule", "gla_perdim"])
def test_chunk_grad_memory_is_per_chunk_not_per_token(op):
  """fwd+bwd at B=1, T=4096, H=2, K=V=64 must not store a state per token (T*H*K*V floats)."""
  b, t, h, d = 1, 4096, 2, 64
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  per_token_state_bytes = t * h * d * d * 4

  def fwd_bwd(impl, q, k, v, bt, g):
    if op == "delta_rule":
      loss = lambda q, k, v, bt, g: pk.delta_rule(q, k, v, bt, g=g, impl=impl)[0].sum()
    else:
      loss = lambda q, k, v, bt, g: pk.gla(q, k, v, g, impl=impl)[0].sum()
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, bt, g)

  g_shape = (b, t, h) if op == "delta_rule" else (b, t, h, d)
  shapes = (spec(b, t, h, d), spec(b, t, h, d), spec(b, t, h, d), spec(b, t, h), spec(*g_shape))
  temp = {impl: jax.jit(fwd_bwd, static_argnums=0).lower(impl, *shapes).compile().memory_analysis().temp_size_in_bytes
          for impl in ("chunk", "scan")}
  assert temp["scan"] >= per_token_state_bytes  # the reference does store every state
  assert temp["chunk"] < per_token_state_bytes / 8, temp


def test_gpu_without_the_triton_backend_takes_mosaic_gpu_or_says_why(monkeypatch):
  from pallas_kernels import _compat, dispatch

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(dispatch, "_hopper", lambda: True)
  monkeypatch.delenv("PALLAS_KERNELS_GPU", raising=False)
  monkeypatch.setattr(_compat, "pltriton", None)
  monkeypatch.setattr(dispatch, "_mosaic_gpu_unsupported", lambda *_: None)
  assert dispatch.pallas_backend(jnp.bfloat16, 128, 128, 64) == "mosaic_gpu"
  assert resolve_impl("auto", ("scan", "chunk", "pallas"), op="delta_rule", dtype=jnp.bfloat16, kd=128,
                      vd=128, chunk_size=64) == "chunk"     # auto takes Pallas only for the fused Triton kernels
  monkeypatch.setattr(dispatch, "_mosaic_gpu_unsupported", lambda *_: "16-bit inputs only")
  with pytest.raises(ValueError, match="no Pallas Triton backend and 16-bit inputs only; impl='chunk'"):
    dispatch.pallas_backend(jnp.float32, 128, 128, 64)
  with pytest.raises(RuntimeError, match="no Pallas Triton backend"):
    _compat.triton_params(4, 1)


def test_package_imports_without_the_triton_backend():
  """A jax that has dropped jax.experimental.pallas.triton still imports the package and runs the
  chunked form (a fresh interpreter in which that module cannot be imported)."""
  import subprocess
  import sys
  code = ("import sys; sys.modules['jax.experimental.pallas.triton'] = None\n"
          "import jax.numpy as jnp, pallas_kernels as pk\n"
          "from pallas_kernels import _compat\n"
          "assert not _compat.has_triton_backend()\n"
          "x = jnp.ones((1, 8, 1, 16)) / 4\n"
          "o, _ = pk.delta_rule(x, x, x, jnp.full((1, 8, 1), 0.5), impl='chunk', chunk_size=4)\n"
          "print(float(o.sum()))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("variant", ["gla_scalar", "gated_delta"])
@pytest.mark.parametrize("impl", ["chunk", "pallas:generic:fused", "pallas:generic:state_pass"])
def test_an_id_that_comes_back_starts_a_new_segment(variant, impl):
  """Ids [5, 5, 7, 7, 5, 5] inside one chunk are three segments: the state restarts at every
  change (as the scan does), so the second run of 5s must not see the first."""
  inputs = make_inputs(11, variant, b=2, t=40, gate_scale=0.05)
  # Row 0: 5, 7, 5 inside the first 16-token chunk; row 1: the second chunk opens with 1s then 3s
  # again, the id its incoming state (from the first chunk's 3s) carried.
  seg = np.array([[5] * 4 + [7] * 4 + [5] * 18 + [9] * 14, [3] * 16 + [1] * 3 + [3] * 21], np.int32)
  seg = jnp.asarray(seg)
  from tests.kernels.recurrence_cases import run
  ref_o, ref_s = run(variant, "scan", inputs, segment_ids=seg)
  o, s = run(variant, impl, inputs, chunk_size=16, segment_ids=seg)
  assert_rel_close("o", ref_o, o, 1e-4)
  assert_rel_close("final state", ref_s, s, 1e-4)


def test_hopper_takes_mosaic_gpu_for_the_ops_measured_faster(monkeypatch):
  """GLA (scalar or no decay) and the (gated) delta rule in bf16 go to the fused Mosaic GPU kernels
  on Hopper under PALLAS_KERNELS_GPU=auto where they take the inputs, nothing else does, and
  =triton keeps Triton."""
  from pallas_kernels import dispatch

  monkeypatch.setattr(dispatch, "_hopper", lambda: True)
  monkeypatch.delenv("PALLAS_KERNELS_GPU", raising=False)
  takes = lambda op="gla", backend="triton", dtype=jnp.bfloat16, kd=128, vd=128, chunk=64: \
      dispatch.takes_mosaic_gpu(op, backend, dtype, kd, vd, chunk)
  from pallas_kernels.common import state_pass_mosaic_gpu
  if state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 128, 128) is not None:
    assert not takes()                                            # a jax without the Mosaic GPU kernels
    return
  assert takes()
  assert takes(kd=64, vd=2048)                                    # the Rodimus shape, scalar decay
  assert takes(kd=128, chunk=128)
  assert not takes(op="gla_perdim")
  # Were per-dim GLA measured faster, its own kernels' limits would apply (float16 taken, unlike
  # the delta rule's; chunk a power of two).
  monkeypatch.setattr(dispatch, "MOSAIC_GPU_FASTER", dispatch.MOSAIC_GPU_FASTER + ("gla_perdim",))
  assert takes(op="gla_perdim") and takes(op="gla_perdim", dtype=jnp.float16)
  assert not takes(op="gla_perdim", chunk=192)
  monkeypatch.setattr(dispatch, "MOSAIC_GPU_FASTER", dispatch.MOSAIC_GPU_FASTER[:-1])
  assert takes(op="delta_rule") and takes(op="gated_delta_rule")
  assert not takes(op="delta_rule", dtype=jnp.float16)            # timed and tested in bf16 only
  assert takes(op="gla", dtype=jnp.float16)
  assert not takes(op="delta_rule", kd=256, chunk=128)            # over the shared memory
  assert not takes(backend="interpret")
  assert not takes(dtype=jnp.float32)                             # wgmma wants 16-bit operands
  assert not takes(kd=96)
  assert not takes(kd=256, chunk=128)                             # over the shared memory
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "triton")
  assert not takes()
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "auto")
  monkeypatch.setattr(dispatch, "_hopper", lambda: False)
  assert not takes()
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "mosaic")
  with pytest.raises(ValueError, match="PALLAS_KERNELS_GPU: expected 'auto', 'triton' or 'mosaic_gpu'"):
    takes()


@pytest.mark.parametrize("capability, hopper", [("9.0", True), ("10.0", False), ("12.0", False), ("8.0", False)])
def test_mosaic_gpu_default_is_hopper_only(monkeypatch, capability, hopper):
  """The fused Mosaic GPU kernels use wgmma, which only sm90 has: other GPUs keep Triton."""
  from types import SimpleNamespace

  from pallas_kernels import dispatch
  monkeypatch.setattr(jax, "devices", lambda: [SimpleNamespace(compute_capability=capability)])
  assert dispatch._hopper() is hopper


@pytest.mark.parametrize("fits", [True, False])
@pytest.mark.parametrize("per_dim", [False, True])
def test_gla_pallas_on_mosaic_gpu_takes_the_fused_kernels_where_they_fit(monkeypatch, per_dim, fits):
  """`gla_pallas` on the Mosaic GPU backend: the fused kernels of the decay's kind (scalar or per
  dimension) where they fit shared memory, else the state-pass kernels; never Triton's."""
  from pallas_kernels.ops.gla import pallas as gla_pallas_module

  calls, asked = [], []
  monkeypatch.setattr(gla_pallas_module, "pallas_backend", lambda *a: "mosaic_gpu")
  monkeypatch.setattr(gla_pallas_module, "check_pallas_shapes", lambda *a: None)
  monkeypatch.delenv("PALLAS_KERNELS_FUSED", raising=False)
  module = gla_pallas_module.gla_perdim_kernels_mosaic_gpu if per_dim else gla_pallas_module.chunk_kernels_mosaic_gpu
  monkeypatch.setattr(module, "fused_unsupported", lambda *a: asked.append(a) or (None if fits else "too big"))
  for name in ("gla_fused_mosaic_gpu", "gla_fused", "gla_state_pass"):
    monkeypatch.setattr(gla_pallas_module, name, lambda *a, name=name, **kw: calls.append(name))
  x = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  g = jnp.zeros((1, 64, 1, 64) if per_dim else (1, 64, 1))
  gla_pallas_module.gla_pallas(x, x, x, g, scale=1.0, s0=None, segment_ids=None, chunk_size=64)
  assert asked == [(64, 64, jnp.bfloat16)]
  assert calls == ["gla_fused_mosaic_gpu" if fits else "gla_state_pass"]


@pytest.mark.parametrize("mosaic", [True, False])
@pytest.mark.parametrize("per_dim", [False, True])
def test_gla_pallas_routes_by_the_measured_choice(monkeypatch, mosaic, per_dim):
  """`gla_pallas` on the Triton backend: the fused Mosaic GPU op (compiled, with the segment ids)
  where `takes_mosaic_gpu` says so for the op's name, else Triton's."""
  from pallas_kernels.ops.gla import pallas as gla_pallas_module

  calls, asked = [], []
  monkeypatch.setattr(gla_pallas_module, "pallas_backend", lambda *a: "triton")
  monkeypatch.setattr(gla_pallas_module, "check_pallas_shapes", lambda *a: None)
  monkeypatch.setattr(gla_pallas_module, "takes_mosaic_gpu", lambda op, *a: asked.append(op) or mosaic)
  monkeypatch.setattr(gla_pallas_module, "gla_fused_mosaic_gpu", lambda *a, **kw: calls.append(("mosaic_gpu", kw)))
  monkeypatch.setattr(gla_pallas_module, "gla_fused", lambda *a, **kw: calls.append(("triton", kw)))
  x = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  g = jnp.zeros((1, 64, 1, 64) if per_dim else (1, 64, 1))
  seg = jnp.zeros((1, 64), jnp.int32)
  gla_pallas_module.gla_pallas(x, x, x, g, scale=1.0, s0=None, segment_ids=seg, chunk_size=64)
  assert asked == ["gla_perdim" if per_dim else "gla"]
  (path, kw), = calls
  assert path == ("mosaic_gpu" if mosaic else "triton") and kw["segment_ids"] is seg and kw["interpret"] is False
