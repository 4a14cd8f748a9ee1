"""Shared test setup: 8 fake CPU devices for sharding tests, XLA's cheap compile mode, compiled
programs released after each test module, one relative-error check."""
import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's shapes are tiny, so compiling dominates it: XLA's most optimisations off halved a
# kernel-agreement module's time (95 -> 44 s, 2 cores). Numerics are checked against the scan
# under the same tolerances; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite fully optimised.
# Set here, the CLI and notebook tests' subprocesses inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Every XLA:CPU executable keeps its JIT-compiled code in memory maps. One process running the
  whole suite reached Linux's default limit of 65,530 maps (vm.max_map_count) in the model tests
  and crashed inside the compiler (SIGSEGV / SIGABRT, jax 0.10); the kernel agreement modules
  alone add ~25,000 maps. Dropping jax's caches once a module is done frees its executables."""
  yield
  jax.clear_caches()
  gc.collect()


def require_shared_data(*files):
  """Skips the calling test, naming what is absent, when these files of the shared data folder
  (ELM_DATA_DIR, else ../shared/data beside the repository) are not there: it lies outside the
  repository, so a clone on its own has no copy."""
  from efficient_lm.training.config import shared_data_dir  # noqa: PLC0415
  folder = shared_data_dir()
  missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
  if missing:
    pytest.skip(f"{', '.join(missing)} absent from {folder} (set ELM_DATA_DIR)")


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
