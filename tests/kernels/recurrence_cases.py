"""Random inputs for the recurrences and one way to call every op variant, shared by the kernel tests."""
from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

# name -> (family, gate kind)
VARIANTS = {
    "gla_nodecay": ("gla", None),
    "gla_scalar": ("gla", "scalar"),
    "gla_perdim": ("gla", "perdim"),
    "delta": ("delta", None),
    "gated_delta": ("delta", "scalar"),
}


def make_inputs(seed, variant, *, b=2, t=37, h=2, kd=16, vd=24, dtype=jnp.float32, gate_scale=1.0):
  """Fresh inputs as recurrences.md section 4 asks: normalised keys, beta = sigmoid(randn),
  g = gate_scale * logsigmoid(randn)."""
  family, gate = VARIANTS[variant]
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  k = normal(b, t, h, kd)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  inputs = {
      "q": jnp.asarray(normal(b, t, h, kd), dtype),
      "k": jnp.asarray(k, dtype),
      "v": jnp.asarray(normal(b, t, h, vd), dtype),
      "s0": jnp.asarray(normal(b, h, kd, vd)),
  }
  gate_shape = {None: None, "scalar": (b, t, h), "perdim": (b, t, h, kd)}[gate]
  if gate_shape is not None:
    inputs["g"] = jnp.asarray(gate_scale * jax.nn.log_sigmoid(normal(*gate_shape)), dtype)
  if family == "delta":
    inputs["beta"] = jnp.asarray(jax.nn.sigmoid(normal(b, t, h)), dtype)
  return inputs


@functools.partial(jax.jit, static_argnames=("variant", "impl", "chunk_size"))
def run(variant, impl, inputs, *, chunk_size=64, segment_ids=None):
  """Calls the op of `variant` on `inputs`; returns (o, final_state).

  `impl` is an op impl, or "pallas:generic" / "pallas:tpu" for the Pallas kernels in interpret mode,
  optionally with the GPU path: "pallas:generic:fused" or "pallas:generic:state_pass" (default: the
  dispatch's choice per op).
  """
  family, _ = VARIANTS[variant]
  env = {}
  if impl.startswith("pallas:"):
    # The interpreter the CPU runs the kernels under, and the path. Both are read from the
    # environment while tracing; `impl` is a static jit argument, so each mode traces (with its
    # variables set, then restored) rather than reusing another mode's executable.
    impl, interpreter, *path = impl.split(":")
    env = {"PALLAS_KERNELS_INTERPRET": interpreter,
           "PALLAS_KERNELS_FUSED": {(): "auto", ("fused",): "1", ("state_pass",): "0"}[tuple(path)]}
  common = dict(initial_state=inputs.get("s0"), return_final_state=True, segment_ids=segment_ids,
                impl=impl, chunk_size=chunk_size)
  with _environment(env):
    if family == "gla":
      return pk.gla(inputs["q"], inputs["k"], inputs["v"], inputs.get("g"), **common)
    return pk.delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], g=inputs.get("g"), **common)


@contextlib.contextmanager
def _environment(values):
  saved = {name: os.environ.get(name) for name in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


@functools.partial(jax.jit, static_argnames=("variant", "impl", "chunk_size"))
def grads(variant, impl, inputs, cotangents, **kwargs):
  """(o, final_state) and the gradients of <o, do> + <s, ds> for every input."""
  def f(inp):
    return run(variant=variant, impl=impl, inputs=inp, **kwargs)

  (o, s), vjp = jax.vjp(f, inputs)
  (d_inputs,) = vjp(tuple(c.astype(x.dtype) for c, x in zip(cotangents, (o, s))))
  return o, s, d_inputs


def random_cotangents(seed, o, s):
  rng = np.random.default_rng(seed + 1000)
  return (jnp.asarray(rng.standard_normal(o.shape), jnp.float32),
          jnp.asarray(rng.standard_normal(s.shape), jnp.float32))


def as_f32(inputs):
  return {name: x.astype(jnp.float32) for name, x in inputs.items()}


def kernel_names(fn, *args):
  """Names of the Pallas kernels in fn's jaxpr, in order (a Mosaic GPU `plgpu.kernel` traces to
  mpmd_map on jax 0.12)."""
  def walk(jaxpr, out):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "mpmd_map":
        out.append(eqn.params["name"])
        continue
      if eqn.primitive.name == "pallas_call":
        out.append(eqn.params["jaxpr"].debug_info.func_name)
      for p in eqn.params.values():
        inner = getattr(p, "jaxpr", p)
        if hasattr(inner, "eqns") and eqn.primitive.name != "pallas_call":
          walk(inner, out)
    return out
  return walk(jax.make_jaxpr(fn)(*args).jaxpr, [])
