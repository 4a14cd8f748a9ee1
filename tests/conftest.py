"""Shared test setup: 8 fake CPU devices for sharding tests, one relative-error check."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_rel_close(name, ref, out, tol):
  """||out - ref|| / ||ref|| < tol, and both finite."""
  out = np.asarray(out, np.float64)
  assert np.all(np.isfinite(out)), f"{name}: non-finite values"
  err = rel_err(out, ref)
  assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"
