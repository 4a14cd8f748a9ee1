"""The MoE expert matmuls through every ragged-dot path agree with jax.lax.ragged_dot, forward
and gradients, in float32 and bfloat16; the layer stays dropless."""
import jax
import jax.numpy as jnp
from jax import export
import numpy as np
import pytest

from efficient_lm import kernels
from efficient_lm.layers.moe import expert_mlp, route
from pallas_kernels.moe import triton as moe_triton
from tests.conftest import assert_rel_close
from tests.fastpaths.helpers import fake_tokamax, pretend

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _case(dtype, skew, tileable=False):
  """tileable: token rows and widths the Pallas MoE kernels tile (else the down projection's
  K = 24 and the 135 token rows do not)."""
  rng = np.random.default_rng(1)
  n, d, hid, e, k = (48, 32, 32, 6, 3) if tileable else (45, 16, 24, 6, 3)
  x = jnp.asarray(rng.normal(size=(n, d)), dtype)
  ws = tuple(jnp.asarray(rng.normal(size=s) * 0.3, dtype) for s in ((e, d, hid), (e, d, hid), (e, hid, d)))
  logits = jnp.asarray(rng.normal(size=(n, e)), jnp.float32)
  if skew:   # two experts take almost everything, two get nothing
    logits = logits + jnp.asarray([20.0, 12.0, 8.0, 0, -30.0, -30.0])
  _, idx, w = route(logits, k)
  return x, idx, w, ws


def _value_and_grads(impl, x, idx, w, ws):
  def f(x, wg, wu, wd):
    return expert_mlp(x, idx, w, wg, wu, wd, impl=impl)
  out = f(x, *ws)
  cot = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
  grads = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot), argnums=(0, 1, 2, 3))(x, *ws)
  return out, grads


def _dense_reference(x, idx, w, ws):
  """Float32, per token, no sorting: every token through its k experts."""
  wg, wu, wd = (a.astype(jnp.float32)[idx] for a in ws)
  x = x.astype(jnp.float32)
  h = jax.nn.silu(jnp.einsum("nd,nkdh->nkh", x, wg)) * jnp.einsum("nd,nkdh->nkh", x, wu)
  return jnp.einsum("nkh,nkhd,nk->nd", h, wd, w)


def _compare(impl_out, ref_out, dtype):
  out, grads = impl_out
  r_out, r_grads = ref_out
  assert_rel_close("moe forward", r_out.astype(jnp.float32), out.astype(jnp.float32), TOL[dtype])
  for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down"), r_grads, grads):
    assert_rel_close(f"moe {name}", a.astype(jnp.float32), b.astype(jnp.float32), TOL[dtype])
    assert float(jnp.max(jnp.abs(b.astype(jnp.float32)))) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_path_matches_dense_reference(dtype):
  x, idx, w, ws = _case(dtype, skew=True)
  out = expert_mlp(x, idx, w, *ws, impl="xla")
  assert_rel_close("dropless fused gate/up", _dense_reference(x, idx, w, ws), out.astype(jnp.float32),
                   TOL[dtype])


def _count_calls(monkeypatch, module, *names):
  """Wraps module.name for each name so that calls are counted: -> {name: [call, ...]}."""
  calls = {name: [] for name in names}
  for name in names:
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _real=real, _log=calls[name], **kw: _log.append(1) or _real(*a, **kw))
  return calls


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_on_a_hopper_goes_through_tokamax_and_the_pallas_kernels(monkeypatch, dtype, skew):
  """On an H100 (pretended; tokamax faked with XLA ops, the Pallas kernels interpreted) the
  tokamax branch takes the forward and input gradient of both expert matmuls, the Pallas kernel
  both weight gradients, the Pallas gather the token rows both ways, and all of it agrees with
  the XLA path (skew: two experts get no token, two take groups of several 64-row steps)."""
  tokamax_calls = []
  pretend(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3", 9, fake_tokamax(tokamax_calls))
  pallas = _count_calls(monkeypatch, moe_triton, "grouped_weight_grad", "gather_rows")
  tiled = _count_calls(monkeypatch, kernels, "grouped_weight_grad")
  x, idx, w, ws = _case(dtype, skew, tileable=True)
  got = _value_and_grads("auto", x, idx, w, ws)
  assert tokamax_calls.count("ragged_dot") >= 4
  # gathers: the forward's, then the gradient's forward and backward
  assert (len(pallas["grouped_weight_grad"]), len(pallas["gather_rows"]), len(tiled["grouped_weight_grad"])) == (2, 3, 0)
  pretend(monkeypatch, "cpu", "cpu", 0, None)
  _compare(got, _value_and_grads("xla", x, idx, w, ws), dtype)


@pytest.mark.parametrize("backend, kind, setting, tileable, want_pallas, want_tiled", [
    ("gpu", "NVIDIA H100 80GB HBM3", "pallas", True, 2, 0),
    ("gpu", "NVIDIA H100 80GB HBM3", "pallas", False, 1, 1),   # the down projection's K = 24 does not tile
    ("gpu", "NVIDIA H100 80GB HBM3", "tiled", True, 0, 2),
    ("gpu", "NVIDIA H100 80GB HBM3", "tokamax", True, 0, 0),
    ("tpu", "TPU v5 lite", "pallas", True, 0, 0),     # the race was seen in the Hopper kernel only
])
def test_which_weight_gradient_the_tokamax_path_takes(monkeypatch, backend, kind, setting, tileable, want_pallas,
                                                      want_tiled):
  pretend(monkeypatch, backend, kind, 9, fake_tokamax([]))
  monkeypatch.setattr(kernels, "RAGGED_DOT_WEIGHT_GRAD", setting)
  pallas = _count_calls(monkeypatch, moe_triton, "grouped_weight_grad")
  tiled = _count_calls(monkeypatch, kernels, "grouped_weight_grad")
  x, idx, w, ws = _case(jnp.float32, skew=False, tileable=tileable)
  _value_and_grads("auto", x, idx, w, ws)
  assert (len(pallas["grouped_weight_grad"]), len(tiled["grouped_weight_grad"])) == (want_pallas, want_tiled)
  monkeypatch.setattr(kernels, "RAGGED_DOT_WEIGHT_GRAD", "racy")
  with pytest.raises(ValueError, match="RAGGED_DOT_WEIGHT_GRAD"):
    _value_and_grads("auto", x, idx, w, ws)


@pytest.mark.parametrize("backend, kind, setting, want", [
    ("gpu", "NVIDIA H100 80GB HBM3", "pallas", 3), ("gpu", "NVIDIA H100 80GB HBM3", "xla", 0), ("cpu", "cpu", "pallas", 0)])
def test_which_row_gather_the_dispatch_takes(monkeypatch, backend, kind, setting, want):
  pretend(monkeypatch, backend, kind, 9, fake_tokamax([]))
  monkeypatch.setattr(kernels, "ROW_GATHER", setting)
  pallas = _count_calls(monkeypatch, moe_triton, "gather_rows")
  x, idx, w, ws = _case(jnp.float32, skew=False, tileable=True)
  _value_and_grads("auto", x, idx, w, ws)
  assert len(pallas["gather_rows"]) == want
  monkeypatch.setattr(kernels, "ROW_GATHER", "triton")
  with pytest.raises(ValueError, match="ROW_GATHER"):
    kernels.gather_rows(x, jnp.arange(8))


def _per_group_products(x, dy, sizes):
  start = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
  return np.stack([x[start[g]:start[g + 1]].T @ dy[start[g]:start[g + 1]] for g in range(len(sizes))])


@pytest.mark.parametrize("sizes, rows, k, n", [
    ([5, 0, 130, 8, 0, 64], 224, 32, 48),    # a group of three 64-row steps, one of exactly one, rows left over
    ([0, 0, 200, 0], 200, 16, 128), ([1, 2, 3, 20], 40, 64, 16), ([0, 0, 0], 16, 16, 16), ([300, 0, 17], 317, 448, 32)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_grouped_weight_grad_matches_per_group_products(sizes, rows, k, n, dtype):
  """The Pallas kernel (interpreted) against per-group float64 products of the same (rounded)
  inputs, fresh random: empty groups, groups over several row steps, rows past the last group,
  K = 448 (the rmoe-paper expert width, 64-wide blocks)."""
  rng = np.random.default_rng(sum(sizes) + rows + k)
  x, dy = jnp.asarray(rng.standard_normal((rows, k)), dtype), jnp.asarray(rng.standard_normal((rows, n)), dtype)
  got = moe_triton.grouped_weight_grad(x, dy, jnp.asarray(sizes, jnp.int32), interpret=True)
  want = _per_group_products(np.asarray(x, np.float64), np.asarray(dy, np.float64), sizes)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(initial=1.0))


def test_pallas_grouped_weight_grad_keeps_a_neighbours_nonfinite_rows_out():
  x, dy = np.ones((96, 16), np.float32), np.ones((96, 16), np.float32)
  dy[40] = np.inf                                            # row 40 belongs to the second group
  got = np.asarray(moe_triton.grouped_weight_grad(jnp.asarray(x), jnp.asarray(dy), jnp.asarray([32, 64], jnp.int32),
                                                  interpret=True))
  np.testing.assert_array_equal(got[0], np.full((16, 16), 32.0))
  assert np.isinf(got[1]).all()


def test_pallas_moe_kernels_refuse_shapes_they_do_not_tile():
  x = jnp.zeros((24, 24), jnp.float32)
  with pytest.raises(ValueError, match="K and N"):
    moe_triton.grouped_weight_grad(x, x, jnp.asarray([24], jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="dy_PN"):
    moe_triton.grouped_weight_grad(x, x[:8], jnp.asarray([8], jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="idx_P"):
    moe_triton.gather_rows(x, jnp.arange(12), interpret=True)


@pytest.mark.parametrize("p, d", [(64, 48), (16, 256), (40, 16)])
def test_pallas_gather_rows_is_exact(p, d):
  rng = np.random.default_rng(p + d)
  x = jnp.asarray(rng.standard_normal((50, d)), jnp.bfloat16)
  idx = jnp.asarray(rng.integers(0, 50, size=p), jnp.int32)
  np.testing.assert_array_equal(np.asarray(moe_triton.gather_rows(x, idx, interpret=True)), np.asarray(x[idx]))


@pytest.mark.skipif(jax.__version_info__ >= (0, 11),
                    reason="jax >= 0.11 exports for cuda only with an abstract GPU device; the Python 3.11 "
                           "leg (jax 0.10) and the H100 runs of moe_variants.py cover it")
def test_pallas_moe_kernels_lower_for_cuda():
  """Interpret mode does not run the Triton lowering; exporting for CUDA does (no GPU needed)."""
  spec = jax.ShapeDtypeStruct
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for fn, args in ((moe_triton.grouped_weight_grad, (spec((4096, 448), jnp.bfloat16), spec((4096, 1280), jnp.bfloat16),
                                                     spec((16,), jnp.int32))),
                   (moe_triton.grouped_weight_grad, (spec((512, 64), jnp.float32), spec((512, 64), jnp.float32),
                                                     spec((4,), jnp.int32))),
                   (moe_triton.gather_rows, (spec((1024, 1280), jnp.bfloat16), spec((4096,), jnp.int32)))):
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("sizes, rows, tile", [
    ([5, 0, 13, 8, 0, 6], 32, 8), ([8, 8, 8, 8], 32, 8), ([0, 0, 32, 0], 32, 8), ([1, 2, 3, 20], 40, 8),
    ([300, 0, 17, 700], 1024, 128), ([0, 0, 0], 16, 8)])
def test_grouped_weight_grad_matches_per_group_products(sizes, rows, tile):
  """Per group, x[rows of g]^T dy[rows of g] on fresh random inputs, float64 reference: groups
  that straddle tiles, empty groups, rows past the last group (ignored)."""
  rng = np.random.default_rng(sum(sizes) + rows)
  x, dy = rng.standard_normal((rows, 7)), rng.standard_normal((rows, 5))
  got = kernels.grouped_weight_grad(jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32),
                                    jnp.asarray(sizes, jnp.int32), tile=tile)
  start = np.concatenate([[0], np.cumsum(sizes)])
  want = np.stack([x[start[g]:start[g + 1]].T @ dy[start[g]:start[g + 1]] for g in range(len(sizes))])
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(initial=1.0))


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_real_tokamax_matches_xla(dtype, skew):
  pytest.importorskip("tokamax")
  if kernels.tokamax_module() is None:
    pytest.skip("the installed tokamax does not suit this jax")
  x, idx, w, ws = _case(dtype, skew)
  _compare(_value_and_grads("tokamax", x, idx, w, ws), _value_and_grads("xla", x, idx, w, ws), dtype)
