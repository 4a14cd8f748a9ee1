"""The Mosaic GPU state-pass kernels (`state_pass_mosaic_gpu`): every op variant against the float32
scan under Mosaic GPU interpret mode (simulated shared memory, TMA and barriers), their lowering to
the Mosaic GPU custom call for CUDA, and the GPU backend choice. jax >= 0.11 (the Python 3.12 CI
leg): older jax has no Mosaic GPU interpret mode."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallas_kernels as pk
from pallas_kernels import dispatch
from pallas_kernels.common import state_pass_mosaic_gpu
from pallas_kernels.common.chunking import run_chunked
from pallas_kernels.ops.delta_rule.chunk import delta_rule_gates
from pallas_kernels.ops.delta_rule.pallas import _delta_rule_pallas
from pallas_kernels.ops.gla.chunk import gla_gates
from pallas_kernels.ops.gla.pallas import _gla_pallas
from tests.kernels.recurrence_cases import VARIANTS, make_inputs
from tests.kernels.test_chunk_agreement import TOL, check_against_reference, random_segments

pytestmark = pytest.mark.skipif(
    state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64) is not None,
    reason=str(state_pass_mosaic_gpu.supports(jnp.bfloat16, 64, 64, 64)))

BF16 = TOL[jnp.bfloat16]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("t, kd, vd, chunk", [(100, 64, 128, 64), (150, 128, 64, 128)],
                         ids=["T100-K64-V128-C64", "T150-K128-V64-C128"])
def test_mosaic_gpu_matches_scan(variant, t, kd, vd, chunk):
  """Forward, final state and every gradient (q, k, v, beta / g, initial state); T not a multiple
  of the chunk, several value blocks, K != V."""
  inputs = make_inputs(41, variant, b=1, t=t, h=2, kd=kd, vd=vd, dtype=jnp.bfloat16)
  check_against_reference(variant, inputs, BF16, (chunk,), 41, impl="pallas:mosaic_gpu:state_pass")


@pytest.mark.parametrize("variant", ["gla_perdim", "gated_delta"])
def test_mosaic_gpu_segments_and_strong_decay(variant):
  inputs = make_inputs(43, variant, b=2, t=90, h=1, kd=64, vd=64, dtype=jnp.bfloat16, gate_scale=10.0)
  seg = jnp.asarray(random_segments(np.random.default_rng(43), 2, 90, 3))
  check_against_reference(variant, inputs, BF16, (64,), 43, segment_ids=seg, impl="pallas:mosaic_gpu:state_pass")


def _fwd_bwd(family, kd):
  def loss(q, k, v, beta, g, s0):
    if family == "delta_rule":
      op, gates = functools.partial(_delta_rule_pallas, kd ** -0.5, "mosaic_gpu"), delta_rule_gates(beta, g)
    else:
      op, gates = functools.partial(_gla_pallas, kd ** -0.5, "mosaic_gpu"), gla_gates(g, q)
    o, s = run_chunked(op, q, k, v, gates, s0=s0, segment_ids=None, chunk_size=64)
    return o.astype(jnp.float32).sum() + s.sum()
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


@pytest.mark.parametrize("kd, vd", [(128, 128), (64, 256)])
@pytest.mark.parametrize("family", ["delta_rule", "gla"])
def test_mosaic_gpu_kernels_lower_for_cuda(family, kd, vd):
  """Interpret mode checks neither layouts nor wgmma operand rules; the Mosaic GPU lowering does.
  Its rule registers only with a GPU plugin, so the test imports the registration itself."""
  import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401, PLC0415

  b, t, h = 2, 256, 2
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  g = spec(b, t, h) if family == "delta_rule" else spec(b, t, h, kd)
  args = (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h), g,
          spec(b, h, kd, vd, dt=jnp.float32))
  exported = export.export(jax.jit(_fwd_bwd(family, kd)), platforms=["cuda"])(*args)
  assert exported.mlir_module().count("mosaic_gpu_v2") == 2   # the forward and the backward pass


def _primitives(fn, *args):
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for p in eqn.params.values():
        for cand in p if isinstance(p, (tuple, list)) else [p]:
          inner = getattr(cand, "jaxpr", cand)
          if hasattr(inner, "eqns"):
            walk(inner)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


def test_interpret_mode_choice_and_refusals(monkeypatch):
  x = make_inputs(1, "gated_delta", t=20, kd=64, vd=64, dtype=jnp.bfloat16)
  f = lambda q: pk.delta_rule(q, x["k"], x["v"], x["beta"], g=x["g"], impl="pallas")[0].astype(jnp.float32).sum()
  monkeypatch.setenv("PALLAS_KERNELS_INTERPRET", "mosaic_gpu")
  assert "wgmma_ref" in _primitives(jax.grad(f), x["q"])
  monkeypatch.setenv("PALLAS_KERNELS_INTERPRET", "generic")
  assert "wgmma_ref" not in _primitives(jax.grad(f), x["q"])
  monkeypatch.setenv("PALLAS_KERNELS_INTERPRET", "mosaic_gpu")
  with pytest.raises(ValueError, match="PALLAS_KERNELS_INTERPRET=mosaic_gpu: wgmma takes float32 only as TF32"):
    f32 = {n: a.astype(jnp.float32) for n, a in x.items()}
    pk.delta_rule(f32["q"], f32["k"], f32["v"], f32["beta"], impl="pallas")
  with pytest.raises(ValueError, match="K must be a multiple of 64"):
    pk.delta_rule(x["q"][..., :32], x["k"][..., :32], x["v"], x["beta"], impl="pallas")
  with pytest.raises(ValueError, match="chunk_size must be a multiple of 64"):
    pk.delta_rule(x["q"], x["k"], x["v"], x["beta"], impl="pallas", chunk_size=32)


def test_gpu_backend_choice(monkeypatch):
  """On a GPU: the Triton backend under PALLAS_KERNELS_GPU=auto (the default) and =triton; under
  =mosaic_gpu the Mosaic GPU kernels where they apply (Hopper, 16-bit, multiples of 64)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(dispatch, "_hopper", lambda: True)
  monkeypatch.delenv("PALLAS_KERNELS_GPU", raising=False)
  assert dispatch.pallas_backend(jnp.bfloat16, 128, 128, 64) == "triton"
  for choice in ("auto", "triton"):
    monkeypatch.setenv("PALLAS_KERNELS_GPU", choice)
    assert dispatch.pallas_backend(jnp.bfloat16, 128, 128, 64) == "triton"
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "mosaic_gpu")
  assert dispatch.pallas_backend(jnp.bfloat16, 128, 128, 64) == "mosaic_gpu"
  assert dispatch.pallas_backend(jnp.float32, 128, 128, 64) == "triton"
  assert dispatch.pallas_backend(jnp.bfloat16, 32, 128, 64) == "triton"
  monkeypatch.setattr(dispatch, "_hopper", lambda: False)
  assert dispatch.pallas_backend(jnp.bfloat16, 128, 128, 64) == "triton"
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "mosaic")
  with pytest.raises(ValueError, match="PALLAS_KERNELS_GPU: expected 'auto', 'triton' or 'mosaic_gpu'"):
    dispatch.pallas_backend(jnp.bfloat16, 128, 128, 64)
