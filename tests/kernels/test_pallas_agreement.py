"""The Pallas path (kernels in generic and TPU interpret mode) against the float32 scan reference,
and the kernels' lowering for the hardware CI does not have."""
from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.common.chunking import run_chunked
from pallas_kernels.ops.delta_rule.chunk import delta_rule_gates
from pallas_kernels.ops.delta_rule.pallas import _delta_rule_pallas
from pallas_kernels.ops.gla.chunk import gla_gates
from pallas_kernels.ops.gla.pallas import _gla_pallas
from tests.kernels.recurrence_cases import VARIANTS, kernel_names, make_inputs, run
from tests.kernels.test_chunk_agreement import TOL, check_against_reference, random_segments

MODES = ["pallas:generic", "pallas:tpu"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t, dtype", [(1, jnp.float32), (17, jnp.float32), (100, jnp.float32),
                                      (257, jnp.float32), (100, jnp.bfloat16)],
                         ids=["1-f32", "17-f32", "100-f32", "257-f32", "100-bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pallas_matches_scan(variant, t, dtype, mode):
  seed = zlib.crc32(f"{variant}-{t}-{dtype.__name__}".encode())
  inputs = make_inputs(seed, variant, t=t, dtype=dtype)
  chunk = 16 if t % 2 else 64
  check_against_reference(variant, inputs, TOL[dtype], (chunk,), seed, impl=mode)


# The state-pass GPU kernels (PALLAS_KERNELS_FUSED=0), at two of the lengths above.
@pytest.mark.parametrize("t, dtype", [(17, jnp.float32), (100, jnp.bfloat16)], ids=["17-f32", "100-bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_pass_kernels_match_scan(variant, t, dtype):
  seed = zlib.crc32(f"{variant}-{t}-{dtype.__name__}-state-pass".encode())
  inputs = make_inputs(seed, variant, t=t, dtype=dtype)
  chunk = 16 if t % 2 else 64
  loss = lambda x: run(variant, "pallas:generic:state_pass", x, chunk_size=chunk)[0].astype(jnp.float32).sum()
  assert kernel_names(jax.grad(loss), inputs) == ["_forward_kernel", "_backward_kernel"]   # state_pass_triton's
  check_against_reference(variant, inputs, TOL[dtype], (chunk,), seed, impl="pallas:generic:state_pass")


@pytest.mark.parametrize("mode", ["pallas:generic:state_pass", "pallas:generic:fused", "pallas:tpu"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pallas_segment_ids_and_strong_decay(variant, mode):
  """Both GPU paths and the TPU kernels."""
  inputs = make_inputs(21, variant, t=90, gate_scale=10.0)
  seg = jnp.asarray(random_segments(np.random.default_rng(21), 2, 90, 4))
  check_against_reference(variant, inputs, TOL[jnp.float32], (16,), 21, segment_ids=seg, impl=mode)


def _fwd_bwd(family, backend, kd):
  """fwd+bwd of the Pallas op on a fixed backend, as a function of shapes only."""
  def loss(q, k, v, beta, g, s0):
    if family == "delta_rule":
      op, gates = functools.partial(_delta_rule_pallas, kd ** -0.5, backend), delta_rule_gates(beta, g)
    else:
      op, gates = functools.partial(_gla_pallas, kd ** -0.5, backend), gla_gates(g, q)
    o, s = run_chunked(op, q, k, v, gates, s0=s0, segment_ids=None, chunk_size=64)
    return o.astype(jnp.float32).sum() + s.sum()
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def _shapes(family, kd, vd, b=2, t=256, h=2):
  spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  g = spec(b, t, h) if family == "delta_rule" else spec(b, t, h, kd)
  return (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h), g,
          spec(b, h, kd, vd, dt=jnp.float32))


@pytest.mark.parametrize("kd, vd", [(64, 64), (128, 128), (64, 128)])
@pytest.mark.parametrize("family", ["delta_rule", "gla"])
def test_tpu_kernels_lower_for_tpu(family, kd, vd):
  """Interpret mode ignores TPU tiling; the real Mosaic lowering does not."""
  exported = export.export(jax.jit(_fwd_bwd(family, "tpu", kd)), platforms=["tpu"])(*_shapes(family, kd, vd))
  assert exported.mlir_module().count("tpu_custom_call") == 2  # the forward and the backward pass


@pytest.mark.skipif(jax.__version_info__ >= (0, 11),
                    reason="jax >= 0.11 exports for cuda only with an abstract GPU device; the H100 run covers it")
@pytest.mark.parametrize("family", ["delta_rule", "gla"])
def test_gpu_kernels_lower_through_triton(family):
  exported = export.export(
      jax.jit(_fwd_bwd(family, "triton", 128)), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*_shapes(family, 128, 128))
  assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2
