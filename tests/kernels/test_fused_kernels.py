"""The fused GPU kernels (`chunk_kernels_triton`; the delta rule and GLA): per-chunk gradients against `jax.vjp` of the pure-JAX chunk, the whole op against the
float32 scan (generic interpret mode), path selection, and the Triton lowering.
`test_pallas_agreement.py` covers the same ops through "pallas:generic" at more lengths; these
add the solve's block merge (C = 32, 64), several value blocks and K != V."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import dispatch
from pallas_kernels.common import chunk_kernels_triton as ck
from pallas_kernels.common.chunked import chunk_vjp
from pallas_kernels.common.chunking import chunk_masks, segment_chunks, to_chunks
from pallas_kernels.ops.delta_rule.chunk import delta_rule_chunk_terms
from pallas_kernels.ops.delta_rule.pallas import delta_rule_fused
from pallas_kernels.ops.gla.chunk import _scores_per_dim, gla_chunk_terms
from pallas_kernels.ops.gla.pallas import gla_fused
from tests.conftest import assert_rel_close
from tests.kernels.recurrence_cases import kernel_names, make_inputs, run
from tests.kernels.test_chunk_agreement import TOL, check_against_reference, random_segments


def test_unit_lower_inverse_matches_solve():
  rng = np.random.default_rng(0)
  for c in (16, 48, 64):
    a = jnp.asarray(np.tril(rng.standard_normal((c, c)), -1) * 0.3, jnp.float32)
    ref = jnp.linalg.inv(jnp.eye(c) + a)
    for block in (8, 16):
      assert_rel_close(f"C={c} block={block}", ref, ck.unit_lower_inverse(a, "highest", block=block), 1e-5)


@pytest.mark.parametrize("family, gated, segments, c, kd, vd, dtype, low", [
    ("delta", True, True, 32, 16, 128, jnp.float32, False),
    ("delta", False, False, 16, 32, 24, jnp.float32, False),
    ("delta", True, False, 64, 16, 16, jnp.bfloat16, False),
    ("gla", True, True, 32, 16, 128, jnp.float32, False),
    ("gla", False, False, 16, 32, 16, jnp.bfloat16, False),
    ("delta", True, True, 64, 16, 128, jnp.bfloat16, True),
    ("delta", False, False, 32, 32, 64, jnp.bfloat16, True),
    ("gla", True, True, 32, 16, 128, jnp.bfloat16, True),
], ids=["delta-gated-seg-C32-V128", "delta-C16-K32-V24", "delta-gated-C64-bf16",
        "gla-scalar-seg-C32-V128", "gla-nodecay-C16-bf16", "delta-gated-seg-C64-bf16-low",
        "delta-C32-K32-bf16-low", "gla-scalar-seg-C32-bf16-low"])
def test_chunk_grads_match_vjp_of_chunk(family, gated, segments, c, kd, vd, dtype, low):
  """The two gradient kernels with random incoming states and state gradients vs `chunked.chunk_vjp`,
  T from the forward's `_wy_kernel`; `low`: dL/dS, dX and T in the inputs' dtype, so every
  gradient-kernel matmul takes bf16 operands (BF16_GRAD_OPERANDS), else float32."""
  b, h, n = 1, 2, 2
  t = n * c
  rng = np.random.default_rng(c + vd)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  k = normal(b, t, h, kd)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  q, v, do = normal(b, t, h, kd), normal(b, t, h, vd), normal(b, t, h, vd)
  q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
  beta = jax.nn.sigmoid(normal(b, t, h)) if family == "delta" else None
  g = jax.nn.log_sigmoid(normal(b, t, h)) if gated else None
  seg = jnp.asarray(random_segments(rng, b, t, 3)) if segments else None
  s_in, ds_out = normal(b * h, n, kd, vd), normal(b * h, n, kd, vd)
  s_in = s_in.astype(dtype)  # the forward stores the states in the inputs' dtype
  if low:
    ds_out = ds_out.astype(dtype)
  scale = kd ** -0.5

  chunked = lambda x: to_chunks(x, c)
  seg_c, prev_c = segment_chunks(seg, b, t, h, c)
  g_or_zero = chunked(jnp.zeros((b, t, h), jnp.float32) if g is None else g)
  gates = (chunked(beta), g_or_zero) if family == "delta" else (g_or_zero,)
  terms = delta_rule_chunk_terms if family == "delta" else gla_chunk_terms
  states = lambda s: s.astype(jnp.float32).reshape(b, h, n, kd, vd)
  vjp = jax.vmap(jax.vmap(jax.vmap(functools.partial(chunk_vjp, terms, scale))))
  dq, dk, dv, dgates, _ = vjp(chunked(q), chunked(k), chunked(v), gates, seg_c, prev_c,
                              states(s_in), chunked(do), states(ds_out))
  # the kernels' other inputs, X and dL/dX, from the pure-JAX chunk terms
  tms = jax.vmap(jax.vmap(jax.vmap(lambda *a: terms(*a, scale))))(chunked(q), chunked(k), chunked(v), gates,
                                                                   seg_c, prev_c)
  f32 = lambda x: x.astype(jnp.float32)
  hp = functools.partial(jnp.einsum, precision="highest")
  x_ref = f32(chunked(v)) if family == "gla" else tms.u_CV - hp("bhnck,bhnkv->bhncv", tms.w_CK, states(s_in))
  dx_ref = (hp("bhnij,bhniv->bhnjv", tms.p_CC, f32(chunked(do)))
            + hp("bhnck,bhnkv->bhncv", tms.kd_CK, states(ds_out)))
  back = lambda x: jnp.moveaxis(x, 1, 3).reshape(b, t, h, *x.shape[4:])
  x_in = None if family == "gla" else back(x_ref).astype(dtype)   # stored in the inputs' dtype
  dx_in = back(dx_ref) if family == "delta" and not low else back(dx_ref).astype(dtype)
  t_inv = None
  if family == "delta":
    t_dtype = dtype if low else jnp.float32
    *_, t_inv = ck.wy(k, v, beta, ck.chunk_cumsum(g, c, True), seg, chunk=c, t_dtype=t_dtype, interpret=True)
    assert t_inv.dtype == t_dtype
  got = ck.chunk_grads(q, k, v, beta, ck.chunk_cumsum(g, c, True), seg, do, s_in, ds_out, x_in, dx_in, t_inv,
                       scale=scale, chunk=c, interpret=True)

  dbeta, dg = dgates if family == "delta" else (None, dgates[0])
  tol = TOL[dtype]
  for name, ref, out in zip(("dq", "dk", "dv", "dbeta", "dg"), (dq, dk, dv, dbeta, dg), got):
    if out is None:
      assert (name == "dg" and not gated) or (name == "dbeta" and family == "gla"), name
      continue
    assert out.dtype == (dtype if name in ("dq", "dk", "dv") else jnp.float32), name
    assert_rel_close(name, back(ref).astype(jnp.float32), out.astype(jnp.float32), tol)


STRONG_GATE = 30.0    # b falls by about 20 a step: a block's range far past DIAGONAL_MATMUL_MAX_RANGE


def _gate(g, gate):
  """g (logsigmoid of a normal) for `gate`: "weak" as it is, "strong" times STRONG_GATE, or
  "alternating", every other block of SCORE_BLOCK rows strong (in one chunk of 32 or more both
  branches of SCORES_DIAGONAL_MATMUL's choice)."""
  strong = {"weak": False, "strong": True, "alternating": np.arange(g.shape[1]) // ck.SCORE_BLOCK % 2 == 1}[gate]
  return jnp.where(jnp.asarray(strong)[..., None, None], STRONG_GATE * g.astype(jnp.float32), g).astype(g.dtype)


def _diagonal_branches(g, c):
  """[B, T_padded/16, H] the branch of each diagonal block of SCORE_BLOCK rows under
  SCORES_DIAGONAL_MATMUL, from `_diagonal_fits`'s range max |b_t - r| (b: g's in-chunk cumulative
  sum, T zero-padded to a multiple of c as `run_padded` does; r: b of the row before the block,
  block 0 its first row) over the key columns: "matmul" where all fit, "columns" where none does,
  else "either" (the key blocks' split decides)."""
  sub = ck.SCORE_BLOCK
  bsz, t, h, kd = g.shape
  pad = -t % c
  g = np.pad(np.asarray(g, np.float64), [(0, 0), (0, pad), (0, 0), (0, 0)])
  cum = np.cumsum(g.reshape(bsz, -1, c, h, kd), axis=2).reshape(bsz, -1, sub, h, kd)     # [B, T/16, 16, H, K]
  first = (np.arange(cum.shape[1]) % (c // sub) == 0)[None, :, None, None, None]
  prev = np.concatenate([cum[:, :1, -1:], cum[:, :-1, -1:]], axis=1)          # last row of the block before
  fits = np.abs(cum - np.where(first, cum[:, :, :1], prev)).max(axis=2) <= ck.DIAGONAL_MATMUL_MAX_RANGE
  return np.where(fits.all(-1), "matmul", np.where(~fits.any(-1), "columns", "either"))


@pytest.mark.parametrize("diagonal_matmul", [False, True], ids=["column-loop", "diagonal-matmul"])
@pytest.mark.parametrize("c, kd, dtype, segments, gate, unroll, block_k", [
    (64, 32, jnp.float32, True, "weak", 1, None), (32, 16, jnp.float32, False, "strong", 1, None),
    (16, 64, jnp.bfloat16, True, "weak", 1, None), (64, 32, jnp.float32, True, "weak", 4, None),
    (16, 64, jnp.bfloat16, True, "weak", 16, None), (64, 32, jnp.float32, True, "strong", 1, 8),
    (16, 64, jnp.bfloat16, True, "weak", 1, 32), (64, 32, jnp.float32, True, "alternating", 1, None),
    (32, 64, jnp.bfloat16, False, "alternating", 1, 32)],
    ids=["C64-seg", "C32-strong-decay", "C16-bf16-seg", "C64-seg-unroll4", "C16-bf16-seg-unrolled",
         "C64-seg-strong-decay-4-key-blocks", "C16-bf16-seg-2-key-blocks", "C64-seg-alternating-decay",
         "C32-bf16-alternating-decay-2-key-blocks"])
def test_scores_kernel_matches_chunk_scores(c, kd, dtype, segments, gate, unroll, block_k, diagonal_matmul,
                                            kernel_flags):
  """`_scores_kernel` (per-dimension decay) against the pure-JAX chunk form's scores, strong decay
  included (b falls by about 20 a step, far past exp's float32 range in a chunk),
  and its e * Q, d * K and lambda against `gla_chunk_terms`; the diagonal columns one to a loop
  step (the default), four, and all (C = 16 has one block of 16); all key columns in one program
  (the default) or split over 2 and 4 (SCORES_BLOCK_K); the diagonal blocks by the column loop
  or SCORES_DIAGONAL_MATMUL (the default), which takes the matmul under the weak decay, the loop
  under the strong one, and each in some blocks of every chunk under the alternating one."""
  kernel_flags(SCORE_UNROLL=unroll, SCORES_BLOCK_K=block_k, SCORES_DIAGONAL_MATMUL=diagonal_matmul)
  b, h, n = 2, 2, 3
  t = n * c
  rng = np.random.default_rng(c + kd)
  x = make_inputs(c, "gla_perdim", b=b, t=t, h=h, kd=kd, vd=16, dtype=dtype)
  x["g"] = _gate(x["g"], gate)
  branches = _diagonal_branches(x["g"], c).reshape(b, n, c // ck.SCORE_BLOCK, h)
  if gate == "alternating":
    assert ((branches == "matmul").any(2) & (branches == "columns").any(2)).all()
  else:
    assert (branches == {"weak": "matmul", "strong": "columns"}[gate]).all()
  seg = jnp.asarray(random_segments(rng, b, t, 4)) if segments else None
  got, qe, kdk, lam = ck.scores(x["q"], x["k"], ck.chunk_cumsum(x["g"], c, True), seg, chunk=c, interpret=True)
  assert got.shape == (b * h, n, c, c) and got.dtype == dtype and lam.dtype == jnp.float32
  seg_c, prev_c = segment_chunks(seg, b, t, h, c)
  terms = jax.vmap(jax.vmap(jax.vmap(lambda *a: gla_chunk_terms(*a, 1.0))))(
      to_chunks(x["q"], c), to_chunks(x["k"], c), to_chunks(x["v"], c), (to_chunks(x["g"], c),), seg_c, prev_c)
  back = lambda a: jnp.moveaxis(a, 1, 3).reshape(b, t, h, kd)
  assert_rel_close("e * Q", back(terms.qe_CK), qe.astype(jnp.float32), TOL[dtype])
  assert_rel_close("d * K", back(terms.kd_CK), kdk.astype(jnp.float32), TOL[dtype])
  assert_rel_close("lambda", terms.decay_K.reshape(lam.shape), lam, 1e-6)

  def one_chunk(q_CK, k_CK, g_CK, seg_C, prev):
    causal_CC = chunk_masks(seg_C, prev)[2]
    return _scores_per_dim(q_CK, k_CK, jnp.cumsum(g_CK, 0), causal_CC, jax.lax.Precision.HIGHEST)
  f32 = lambda a: to_chunks(a.astype(jnp.float32), c)
  ref = jax.vmap(jax.vmap(jax.vmap(one_chunk)))(f32(x["q"]), f32(x["k"]), f32(x["g"]), seg_c, prev_c)
  assert_rel_close("P", ref.reshape(got.shape), got.astype(jnp.float32), TOL[dtype])


SCAN_CASES = {   # id: (variant, t, c, kd, vd, dtype, segments)
    "gated-seg-C32-V128": ("gated_delta", 70, 32, 16, 128, jnp.float32, True),
    "ungated-C64-K32-V16": ("delta", 50, 64, 32, 16, jnp.float32, False),
    "gated-seg-C16-bf16": ("gated_delta", 45, 16, 16, 64, jnp.bfloat16, True),
    "gla-scalar-seg-C32-V128": ("gla_scalar", 70, 32, 32, 128, jnp.float32, True),
    "gla-scalar-seg-C16-bf16": ("gla_scalar", 45, 16, 32, 64, jnp.bfloat16, True),
    "gla-perdim-seg-C32-V128": ("gla_perdim", 70, 32, 32, 128, jnp.float32, True),
    "gla-perdim-seg-C16-bf16": ("gla_perdim", 45, 16, 32, 64, jnp.bfloat16, True),
}


DEFAULT_SPLIT_OUTPUT, DEFAULT_BF16_GRAD_OPERANDS = ck.SPLIT_OUTPUT, ck.BF16_GRAD_OPERANDS


def _scan_cases(*ids):
  return pytest.mark.parametrize("variant, t, c, kd, vd, dtype, segments",
                                 [SCAN_CASES[i] for i in ids], ids=list(ids))


def _scan_inputs(variant, t, kd, vd, dtype, segments):
  inputs = make_inputs(31, variant, b=2, t=t, h=2, kd=kd, vd=vd, dtype=dtype)
  seg = jnp.asarray(random_segments(np.random.default_rng(31), 2, t, 3)) if segments else None
  return inputs, seg


@_scan_cases(*SCAN_CASES)
def test_fused_op_matches_scan(variant, t, c, kd, vd, dtype, segments):
  """Forward, final state and every gradient (q, k, v, beta, g, initial state) vs the f32 scan."""
  inputs, seg = _scan_inputs(variant, t, kd, vd, dtype, segments)
  check_against_reference(variant, inputs, TOL[dtype], (c,), 31, segment_ids=seg, impl="pallas:generic:fused")


@pytest.fixture
def kernel_flags(monkeypatch):
  """Sets the kernels' flags (SPLIT_OUTPUT, BF16_GRAD_OPERANDS) for one test. The kernels read them while
  tracing, and they are no part of the jit cache keys of `run` and `grads`: without clearing jax's
  caches a test would rerun what an earlier test compiled with other flags (in session 4 a full run
  took 0.2 s for the split checks, which had reused the executables an earlier test compiled
  without the split)."""
  def set_flags(**flags):
    for name, value in flags.items():
      monkeypatch.setattr(ck, name, value)
    jax.clear_caches()
  yield set_flags
  jax.clear_caches()    # nor may later tests reuse this test's executables


# the delta rule gated and ungated and GLA, with segments and T not a multiple of the chunk
@_scan_cases("gated-seg-C32-V128", "ungated-C64-K32-V16", "gla-scalar-seg-C32-V128", "gated-seg-C16-bf16",
             "gla-perdim-seg-C16-bf16")
@pytest.mark.parametrize("split", [True, False], ids=["split", "fused-output"])
def test_split_output_matches_scan(variant, t, c, kd, vd, dtype, segments, split, kernel_flags):
  """SPLIT_OUTPUT (the default): `_output_kernel` runs in the training forward only (inference
  keeps O fused); off, the state pass computes O in every forward. Off, then forward and every
  gradient against the f32 scan (on, the default, test_fused_op_matches_scan checks the same cases)."""
  kernel_flags(SPLIT_OUTPUT=split)
  inputs, seg = _scan_inputs(variant, t, kd, vd, dtype, segments)
  fwd = lambda x: run(variant, "pallas:generic:fused", x, chunk_size=c, segment_ids=seg)[0].astype(jnp.float32).sum()
  first = {"delta": ["_wy_kernel"], "gla_perdim": ["_cumsum_kernel", "_scores_kernel"]}.get(variant.replace("gated_", ""), [])
  last = {"delta": ["_wy_grad_kernel"],
          "gla_perdim": ["_scores_grad_kernel", "_cumsum_kernel"]}.get(variant.replace("gated_", ""), [])
  state_pass = first + ["_forward_kernel"]
  backward = ["_state_grad_kernel", "_dqk_kernel"] + last
  assert kernel_names(fwd, inputs) == state_pass
  assert kernel_names(jax.grad(fwd), inputs) == state_pass + (["_output_kernel"] if split else []) + backward
  if split != DEFAULT_SPLIT_OUTPUT:
    check_against_reference(variant, inputs, TOL[dtype], (c,), 31, segment_ids=seg, impl="pallas:generic:fused")


@_scan_cases("gated-seg-C32-V128", "gated-seg-C16-bf16", "gla-scalar-seg-C16-bf16", "gla-perdim-seg-C16-bf16")
@pytest.mark.parametrize("bf16_grads", [True, False], ids=["bf16-grads", "f32-grads"])
def test_grad_operands_match_scan(variant, t, c, kd, vd, dtype, segments, bf16_grads, kernel_flags):
  """BF16_GRAD_OPERANDS on (the default) and off (float32 intermediates and TF32 matmuls in the
  backward; a no-op for float32 inputs): the dtypes of what the forward stores for the backward
  (T) and of the reverse pass's outputs (dL/dS, dX); off, then forward and every gradient against
  the f32 scan (on, the default, test_fused_op_matches_scan checks the same cases)."""
  kernel_flags(BF16_GRAD_OPERANDS=bf16_grads)
  inputs, seg = _scan_inputs(variant, t, kd, vd, dtype, segments)
  beta = inputs.get("beta")
  q, k, v = (inputs[n][:, :c] for n in ("q", "k", "v"))
  b, _, h, _ = q.shape
  common = dict(scale=kd ** -0.5, chunk=c, interpret=True)
  s0 = jnp.zeros((b * h, kd, vd), jnp.float32)
  _, _, (_, w, _, t_inv, _, _) = ck.forward(q, k, v, None if beta is None else beta[:, :c].astype(jnp.float32), None,
                                      s0, None, store_states=True, **common)
  ds_out, _, dx = ck.state_grads(q, k, w, None, None, v, s0, **common)
  stored = dtype if bf16_grads else jnp.float32
  assert ds_out.dtype == stored
  if "delta" in variant:
    assert t_inv.shape == (b * h, 1, c, c) and t_inv.dtype == stored and dx.dtype == stored
  else:
    assert t_inv is None and dx.dtype == dtype   # GLA: dX is dv, in the inputs' dtype
  if bf16_grads != DEFAULT_BF16_GRAD_OPERANDS:
    check_against_reference(variant, inputs, TOL[dtype], (c,), 31, segment_ids=seg, impl="pallas:generic:fused")


@_scan_cases("gla-perdim-seg-C16-bf16", "gla-perdim-seg-C32-V128")
def test_xla_cumsum_matches_scan(variant, t, c, kd, vd, dtype, segments, kernel_flags):
  """PALLAS_CUMSUM off: a per-dimension decay's in-chunk sums in XLA, forward and every gradient
  against the f32 scan (on, the default, test_fused_op_matches_scan checks the same cases)."""
  kernel_flags(PALLAS_CUMSUM=False)
  inputs, seg = _scan_inputs(variant, t, kd, vd, dtype, segments)
  fwd = lambda x: run(variant, "pallas:generic:fused", x, chunk_size=c, segment_ids=seg)[0].astype(jnp.float32).sum()
  assert "_cumsum_kernel" not in kernel_names(jax.grad(fwd), inputs)
  check_against_reference(variant, inputs, TOL[dtype], (c,), 31, segment_ids=seg, impl="pallas:generic:fused")


@_scan_cases("gla-perdim-seg-C16-bf16", "gla-perdim-seg-C32-V128")
@pytest.mark.parametrize("gate, diagonal_matmul", [("weak", True), ("strong", False), ("strong", True),
                                                   ("alternating", True)],
                         ids=["weak-diagonal-matmul", "strong-column-loop", "strong-diagonal-matmul",
                              "alternating-diagonal-matmul"])
def test_scores_diagonal_matmul_matches_scan(variant, t, c, kd, vd, dtype, segments, gate, diagonal_matmul,
                                             kernel_flags):
  """SCORES_DIAGONAL_MATMUL: per-dimension GLA's forward and every gradient against the f32 scan,
  under a weak decay (every diagonal block of both score kernels by the matmul), a strong one (by
  the column loop; but for blocks of padding only) and an alternating one (each in some blocks);
  the strong decay also with the column loop alone (the flag off; test_fused_op_matches_scan checks
  the weak decay under the default)."""
  kernel_flags(SCORES_DIAGONAL_MATMUL=diagonal_matmul)
  inputs, seg = _scan_inputs(variant, t, kd, vd, dtype, segments)
  inputs["g"] = _gate(inputs["g"], gate)
  expected = {"weak": {"matmul"}, "strong": {"columns"}, "alternating": {"matmul", "columns"}}[gate]
  assert expected <= set(_diagonal_branches(inputs["g"], c).ravel())
  check_against_reference(variant, inputs, TOL[dtype], (c,), 31, segment_ids=seg, impl="pallas:generic:fused")


# float16 carries about 8x bf16's precision: the f32-scan error of the case below is 1e-3 with the
# column loop (measured); an overflowed diagonal matmul gives inf.
F16_TOL = 3e-3


@pytest.mark.parametrize("diagonal_matmul", [False, True], ids=["column-loop", "diagonal-matmul"])
def test_float16_perdim_gla_matches_scan(diagonal_matmul, kernel_flags):
  """float16 per-dimension GLA, forward and every gradient against the f32 scan, with
  SCORES_DIAGONAL_MATMUL off and on (the default) under a weak decay whose diagonal blocks all fit
  the bound: `_scores_kernel` keeps the column loop for float16 inputs, whose range cannot hold
  the matmul's factors up to e^R (without that, 'diagonal-matmul' fails with inf)."""
  kernel_flags(SCORES_DIAGONAL_MATMUL=diagonal_matmul)
  inputs, seg = _scan_inputs("gla_perdim", 45, 16, 64, jnp.float16, True)
  assert set(_diagonal_branches(inputs["g"], 16).ravel()) == {"matmul"}
  check_against_reference("gla_perdim", inputs, F16_TOL, (16,), 31, segment_ids=seg, impl="pallas:generic:fused")


def test_perdim_decay_read_and_its_gradient_written_in_its_dtype():
  """A bf16 per-dimension decay goes into the kernels as bf16 and dg comes out of the reverse
  in-chunk sum as bf16: no float32 copy of g [B, T, H, K] before, nor a cast of dg after."""
  inputs = make_inputs(5, "gla_perdim", t=32, kd=16, vd=32, dtype=jnp.bfloat16)
  g = inputs["g"]     # q and k have its shape and dtype too: they go in as they are
  f = lambda g: gla_fused(inputs["q"], inputs["k"], inputs["v"], g, scale=0.25, s0=inputs["s0"], segment_ids=None,
                          chunk_size=16, interpret=True)[0].astype(jnp.float32).sum()
  dg = jax.grad(f)(g)
  assert dg.dtype == jnp.bfloat16

  def converts_of_g_shape(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        continue
      dtypes = {eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype}
      if eqn.primitive.name == "convert_element_type" and eqn.invars[0].aval.shape == g.shape and len(dtypes) > 1:
        yield dtypes
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", param)
        if hasattr(inner, "eqns"):
          yield from converts_of_g_shape(inner)

  assert list(converts_of_g_shape(jax.make_jaxpr(jax.grad(f))(g).jaxpr)) == []


def test_pallas_impl_takes_the_fused_kernels(monkeypatch):
  import pallas_kernels as pk

  monkeypatch.setenv("PALLAS_KERNELS_INTERPRET", "generic")
  monkeypatch.setenv("PALLAS_KERNELS_FUSED", "1")
  x = make_inputs(1, "gated_delta", t=20)
  f = lambda q: pk.delta_rule(q, x["k"], x["v"], x["beta"], g=x["g"], impl="pallas")[0].sum()
  assert kernel_names(jax.grad(f), x["q"]) == ["_wy_kernel", "_forward_kernel", "_output_kernel",
                                                 "_state_grad_kernel", "_dqk_kernel", "_wy_grad_kernel"]
  y = make_inputs(1, "gla_scalar", t=20)
  f_gla = lambda q, g: pk.gla(q, y["k"], y["v"], g, impl="pallas")[0].sum()
  assert kernel_names(jax.grad(f_gla), y["q"], y["g"]) == ["_forward_kernel", "_output_kernel",
                                                            "_state_grad_kernel", "_dqk_kernel"]
  per_dim = make_inputs(1, "gla_perdim", t=20)["g"]
  assert kernel_names(jax.grad(f_gla), y["q"], per_dim) == ["_cumsum_kernel", "_scores_kernel", "_forward_kernel",
                                                             "_output_kernel", "_state_grad_kernel", "_dqk_kernel",
                                                             "_scores_grad_kernel", "_cumsum_kernel"]
  monkeypatch.setenv("PALLAS_KERNELS_FUSED", "0")
  assert "_wy_kernel" not in kernel_names(jax.grad(f), x["q"])
  assert "_state_grad_kernel" not in kernel_names(jax.grad(f_gla), y["q"], y["g"])
  monkeypatch.delenv("PALLAS_KERNELS_FUSED")    # the measured default: fused for every op that has them
  f_ungated = lambda q: pk.delta_rule(q, x["k"], x["v"], x["beta"], impl="pallas")[0].sum()
  assert "_wy_kernel" in kernel_names(jax.grad(f_ungated), x["q"])
  assert "_wy_kernel" in kernel_names(jax.grad(f), x["q"])
  assert "_state_grad_kernel" in kernel_names(jax.grad(f_gla), y["q"], y["g"])
  assert "_scores_grad_kernel" in kernel_names(jax.grad(f_gla), y["q"], per_dim)
  monkeypatch.setattr(dispatch, "FUSED_BY_DEFAULT", {**dispatch.FUSED_BY_DEFAULT, "gated_delta_rule": False})
  assert "_wy_kernel" not in kernel_names(jax.grad(f), x["q"])
  monkeypatch.setenv("PALLAS_KERNELS_FUSED", "yes")
  with pytest.raises(ValueError, match="PALLAS_KERNELS_FUSED"):
    jax.make_jaxpr(f)(x["q"])


def _fused_fwd_bwd(family, kd, gated, segments):
  def loss(q, k, v, beta, g, s0, seg):
    common = dict(scale=kd ** -0.5, s0=s0, segment_ids=seg if segments else None, chunk_size=64,
                  interpret=False)
    if family == "delta":
      o, s = delta_rule_fused(q, k, v, beta, g if gated else None, **common)
    else:
      o, s = gla_fused(q, k, v, g if gated else None, **common)
    return o.astype(jnp.float32).sum() + s.sum()
  # the loss too, as a training step: under jax.grad alone XLA drops `_output_kernel` (O's value
  # is not needed for the gradients)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))


@pytest.mark.skipif(jax.__version_info__ >= (0, 11),
                    reason="jax >= 0.11 exports for cuda only with an abstract GPU device; the H200 runs "
                           "of gpu_check_fused.py cover it")
@pytest.mark.parametrize("family, kd, vd, dtype, gated, segments, split, bf16_grads", [
    ("delta", 64, 64, jnp.bfloat16, True, True, True, True),
    ("delta", 128, 128, jnp.bfloat16, True, True, True, True),
    ("delta", 64, 128, jnp.bfloat16, False, False, True, True),
    ("delta", 128, 64, jnp.float32, False, True, True, True),
    ("delta", 128, 128, jnp.float32, True, False, True, True),
    ("gla", 64, 64, jnp.bfloat16, True, True, True, True),
    ("gla", 128, 128, jnp.bfloat16, False, False, True, True),
    ("gla", 128, 128, jnp.float32, True, False, True, True),
    ("delta", 128, 128, jnp.bfloat16, True, True, False, True),
    ("delta", 128, 128, jnp.bfloat16, True, True, True, False),
    ("gla", 128, 64, jnp.bfloat16, True, False, False, False),
    ("gla_perdim", 64, 128, jnp.bfloat16, True, True, True, True),
    ("gla_perdim", 128, 128, jnp.float32, True, False, True, True),
    ("gla_perdim", 64, 64, jnp.bfloat16, True, False, False, False),
])
def test_fused_kernels_lower_through_triton(family, kd, vd, dtype, gated, segments, split, bf16_grads,
                                            monkeypatch):
  monkeypatch.setattr(ck, "SPLIT_OUTPUT", split)
  monkeypatch.setattr(ck, "BF16_GRAD_OPERANDS", bf16_grads)
  _check_lowering(family, kd, vd, dtype, gated, segments, split)


@pytest.mark.skipif(jax.__version_info__ >= (0, 11),
                    reason="jax >= 0.11 exports for cuda only with an abstract GPU device; the H200 runs "
                           "of gpu_check_fused.py cover it")
def test_scores_split_over_key_blocks_lowers_through_triton(monkeypatch):
  monkeypatch.setattr(ck, "SCORES_BLOCK_K", 32)
  _check_lowering("gla_perdim", 128, 128, jnp.bfloat16, True, True, ck.SPLIT_OUTPUT)


@pytest.mark.skipif(jax.__version_info__ >= (0, 11),
                    reason="jax >= 0.11 exports for cuda only with an abstract GPU device; the H200 runs "
                           "of gpu_check_fused.py cover it")
@pytest.mark.parametrize("dtype, diagonal_matmul", [(jnp.bfloat16, False), (jnp.bfloat16, True), (jnp.float32, True)],
                         ids=["bf16-column-loop", "bf16-diagonal-matmul", "f32-diagonal-matmul"])
def test_scores_diagonal_matmul_lowers_through_triton(dtype, diagonal_matmul, monkeypatch):
  """SCORES_DIAGONAL_MATMUL off and on (a lax.cond per diagonal block: scf.if; loops with run-time
  bounds), bf16 operands and float32 ones (three-pass TF32)."""
  monkeypatch.setattr(ck, "SCORES_DIAGONAL_MATMUL", diagonal_matmul)
  _check_lowering("gla_perdim", 128, 128, dtype, True, True, ck.SPLIT_OUTPUT)


def _check_lowering(family, kd, vd, dtype, gated, segments, split):
  b, t, h = 2, 256, 2
  spec = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
  g = spec(b, t, h, kd) if family == "gla_perdim" else spec(b, t, h)
  args = (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h), g,
          spec(b, h, kd, vd, dt=jnp.float32), spec(b, t, dt=jnp.int32))
  exported = export.export(
      jax.jit(_fused_fwd_bwd(family, kd, gated, segments)), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*args)
  # forward: (delta: W/U and) the state pass (split: and the output); backward: the reverse pass,
  # dq/dk (delta: and the solve's)
  # per-dimension GLA: and the scores and their gradient, and the in-chunk sums of g and of dg
  kernels = {"gla": 3, "delta": 5, "gla_perdim": 7 if ck.PALLAS_CUMSUM else 5}[family]
  assert exported.mlir_module().count("__gpu$xla.gpu.triton") == kernels + split


@pytest.mark.parametrize("c, kd, block_k, dtype", [(16, 32, 128, jnp.float32), (32, 64, 32, jnp.bfloat16)])
def test_cumsum_kernel_matches_xla(c, kd, block_k, dtype, kernel_flags):
  """`_cumsum_kernel` (a per-dimension decay's in-chunk sums, forward and reverse) against XLA's
  cumsum on fresh random inputs, one key block (K <= CUMSUM_BLOCK_K) and two."""
  kernel_flags(CUMSUM_BLOCK_K=block_k)
  rng = np.random.default_rng(kd)
  b, n, h = 2, 3, 2
  x = jnp.asarray(rng.standard_normal((b, n * c, h, kd)), dtype)
  chunks = np.asarray(x, np.float64).reshape(b, n, c, h, kd)
  forward = np.cumsum(chunks, axis=2).reshape(x.shape)
  reverse = np.flip(np.cumsum(np.flip(chunks, 2), axis=2), 2).reshape(x.shape)
  got = ck.chunk_cumsum(x, c, True)
  assert got.dtype == jnp.float32
  assert_rel_close("forward", forward, got, 1e-6)
  assert_rel_close("reverse", reverse, ck.chunk_reverse_cumsum(x.astype(jnp.float32), c, True), 1e-6)
