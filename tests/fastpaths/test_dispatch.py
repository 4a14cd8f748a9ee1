"""The one dispatch place: what it picks per platform, overrides, and clean fallbacks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_lm import kernels
from tests.fastpaths.helpers import fake_tokamax, pretend


def test_cpu_picks_the_xla_fallbacks():
  assert jax.default_backend() == "cpu"
  assert kernels.resolve_ragged_dot() == "xla"
  for dtype in (jnp.float32, jnp.bfloat16):
    assert kernels.resolve_attention("auto", dtype, 64) == "xla"


@pytest.mark.parametrize("backend, kind, major, has_tokamax, expected", [
    ("gpu", "NVIDIA H100 80GB HBM3", 9, True, "tokamax"),
    ("gpu", "NVIDIA H100 80GB HBM3", 9, False, "xla"),     # tokamax absent: fallback
    ("gpu", "NVIDIA A100-SXM4-80GB", 8, True, "xla"),      # no Mosaic GPU kernel before Hopper
    ("tpu", "TPU v5 lite", 0, True, "tokamax"),
    ("tpu", "TPU v5 lite", 0, False, "xla"),
    ("cpu", "cpu", 0, True, "xla"),
])
def test_ragged_dot_choice(monkeypatch, backend, kind, major, has_tokamax, expected):
  pretend(monkeypatch, backend, kind, major, fake_tokamax([]) if has_tokamax else None)
  assert kernels.resolve_ragged_dot() == expected


@pytest.mark.parametrize("backend, kind, dtype, head_dim, has_tokamax, expected", [
    ("gpu", "NVIDIA H100 80GB HBM3", jnp.bfloat16, 128, False, "cudnn"),
    ("gpu", "NVIDIA H100 80GB HBM3", jnp.float16, 64, True, "cudnn"),
    ("gpu", "NVIDIA H100 80GB HBM3", jnp.float32, 64, True, "xla"),    # cuDNN flash: 16-bit only
    ("gpu", "NVIDIA H100 80GB HBM3", jnp.bfloat16, 256, True, "xla"),
    ("tpu", "TPU v5 lite", jnp.bfloat16, 128, True, "tokamax"),
    ("tpu", "TPU v5 lite", jnp.bfloat16, 128, False, "xla"),
    ("cpu", "cpu", jnp.bfloat16, 64, True, "xla"),
])
def test_attention_choice(monkeypatch, backend, kind, dtype, head_dim, has_tokamax, expected):
  pretend(monkeypatch, backend, kind, 9, fake_tokamax([]) if has_tokamax else None)
  assert kernels.resolve_attention("auto", dtype, head_dim) == expected


def test_overrides_context_env_and_bad_names(monkeypatch):
  pretend(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3", 9, fake_tokamax([]))
  with kernels.use(ragged_dot="xla", attention="xla"):
    assert kernels.resolve_ragged_dot() == "xla"
    assert kernels.resolve_attention("auto", jnp.bfloat16, 64) == "xla"
  assert kernels.resolve_ragged_dot() == "tokamax"       # context restored
  monkeypatch.setenv("EFFICIENT_LM_RAGGED_DOT", "xla")
  assert kernels.resolve_ragged_dot() == "xla"
  assert kernels.resolve_ragged_dot("tokamax") == "tokamax"   # an explicit impl wins
  with pytest.raises(ValueError, match="ragged_dot"):
    kernels.resolve_ragged_dot("triton")
  monkeypatch.setenv("EFFICIENT_LM_ATTENTION", "flash")
  with pytest.raises(ValueError, match="EFFICIENT_LM_ATTENTION"):
    kernels.resolve_attention()


def test_explicit_tokamax_without_tokamax_is_an_error(monkeypatch):
  pretend(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3", 9, None)
  with pytest.raises(ValueError, match="tokamax"):
    kernels.resolve_ragged_dot("tokamax")
  with pytest.raises(ValueError, match="tokamax"):
    kernels.resolve_attention("tokamax")


def _ragged_case():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32)
  return x, w, jnp.asarray([4, 0, 6], jnp.int32)


def test_auto_routes_through_tokamax_when_it_runs(monkeypatch):
  calls = []
  pretend(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3", 9, fake_tokamax(calls))
  x, w, gs = _ragged_case()
  np.testing.assert_allclose(kernels.ragged_dot(x, w, gs), jax.lax.ragged_dot(x, w, gs), rtol=1e-6)
  assert calls == ["ragged_dot"]


def test_failing_tokamax_falls_back_with_a_warning(monkeypatch):
  def broken(*a, **k):
    raise TypeError("Mesh.__init__() got an unexpected keyword argument 'out_shape'")
  tk = fake_tokamax([])
  tk.ragged_dot = broken
  pretend(monkeypatch, "tpu", "TPU v5 lite", 0, tk)
  monkeypatch.setattr(kernels, "_warned", set())
  x, w, gs = _ragged_case()
  with pytest.warns(RuntimeWarning, match="tokamax.ragged_dot failed"):
    out = kernels.ragged_dot(x, w, gs)
  np.testing.assert_allclose(out, jax.lax.ragged_dot(x, w, gs), rtol=1e-6)
  with pytest.raises(TypeError):                         # but an explicit request fails loudly
    kernels.ragged_dot(x, w, gs, impl="tokamax")


def test_refused_cudnn_falls_back_to_xla(monkeypatch):
  """On this CPU cuDNN refuses while tracing ("cuDNN is not detected"): auto falls back."""
  pretend(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3", 9, None)
  monkeypatch.setattr(kernels, "_warned", set())
  q = jax.random.normal(jax.random.key(0), (1, 8, 2, 16), jnp.bfloat16)
  with pytest.warns(RuntimeWarning, match="cuDNN attention refused"):
    out = kernels.dot_product_attention(q, q, q, is_causal=True, window=3, scale=0.25)
  ref = jax.nn.dot_product_attention(q, q, q, is_causal=True, local_window_size=(3, 0), scale=0.25)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_real_tokamax_import_is_lazy_and_version_checked():
  mod = kernels.tokamax_module()
  try:
    import tokamax  # noqa: F401
  except Exception:
    assert mod is None
    return
  newer_jax = jax.__version_info__[:2] >= (0, 11)
  assert (mod is None) == (newer_jax and tuple(tokamax.__version_info__)[:3] < (0, 0, 17))
