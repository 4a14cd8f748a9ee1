"""Every notebook in notebooks/ runs top to bottom (nbclient, a kernel on this interpreter), its
first code cell is the install cell, and the committed notebooks carry no outputs."""
from __future__ import annotations

import glob
import json
import os
import sys
import time

import pytest

from tests.conftest import require_shared_data

# End-to-end runs (CPU-sized experiments / notebook kernels): the Python 3.11 CI leg runs them.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "*.ipynb")))
MQAR_RESULTS = os.path.join(ROOT, "experiments", "results", "mqar", "mqar.json")
CELL_TIMEOUT_S = 300   # a hung cell fails the test instead of blocking the run


def _read(path):
  nbformat = pytest.importorskip("nbformat")
  return nbformat.read(path, as_version=4)


def _kernel_manager(tmp_path):
  """A kernel spec named python3 that runs sys.executable (this venv), and nothing else: a
  python3 spec installed elsewhere on the machine must not pick another interpreter."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  spec_dir = tmp_path / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (tests)", "language": "python"}))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _kernel_env(notebook: str) -> dict:
  """The test process's environment as a user's notebook would see it: one CPU device (tests/
  conftest.py asks for 8 fake devices in this process)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
  if os.path.basename(notebook).startswith("03_"):
    # Always exercise the training path of the MQAR notebook (it plots a results file if one
    # exists, and trains a small demonstration otherwise).
    env["ELM_MQAR_RESULTS"] = os.path.join(NB_DIR, "no-such-dir", "mqar.json")
  return env


def test_notebooks_found():
  assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_first_code_cell_installs(path):
  nb = _read(path)
  first = next(c for c in nb.cells if c.cell_type == "code")
  assert "install" in first.metadata.get("tags", []), "the first code cell must be tagged 'install'"
  src = first.source
  assert 'find_spec("efficient_lm")' in src and "%pip install" in src, src
  # Nothing else before it: the install comes first, then markdown or code may follow.
  assert not any(c.cell_type == "code" for c in nb.cells[:nb.cells.index(first)])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
  nb = _read(path)
  for i, c in enumerate(nb.cells):
    if c.cell_type == "code":
      assert not c.outputs and c.execution_count is None, f"cell {i} has outputs: clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  if os.path.basename(path) in ("02_train_shakespeare.ipynb", "04_checkpoint_generate.ipynb"):
    require_shared_data("tinyshakespeare.txt")   # their data cell downloads it only where there is a network
  pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  pytest.importorskip("matplotlib")
  from nbclient import NotebookClient

  nb = _read(path)
  km = _kernel_manager(tmp_path)
  client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                          kernel_name="python3", resources={"metadata": {"path": NB_DIR}})
  t0 = time.time()
  try:
    client.execute(env=_kernel_env(path))   # raises CellExecutionError on the first failing cell
  finally:
    # nbclient leaves a kernel it was handed running: stop it (5 s grace, then killed).
    if client.kc is not None:
      client.kc.stop_channels()
    if km.has_kernel:
      km.shutdown_kernel()
  took = time.time() - t0
  print(f"{os.path.basename(path)}: {took:.1f} s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.get("output_type") == "error"]
  assert not errors, errors
  # The kernel ran this environment: the install cell prints the jax version it imported.
  from importlib.metadata import version
  first = next(c for c in nb.cells if c.cell_type == "code")
  printed = "".join(o.get("text", "") for o in first.outputs)
  assert f"| jax {version('jax')} |" in printed, printed


@pytest.mark.skipif(not os.path.exists(MQAR_RESULTS), reason="no MQAR results file yet")
def test_mqar_results_plottable():
  """03_mqar_results.ipynb plots this file: it needs these keys in every row."""
  with open(MQAR_RESULTS) as f:
    results = json.load(f)
  assert isinstance(results.get("meta", {}), dict)
  for row in results["rows"]:
    missing = {"model", "width", "seq_len", "n_pairs", "lr", "accuracy"} - set(row)
    assert not missing, (missing, row)
