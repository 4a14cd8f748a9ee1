"""experiments/scaling.py: one real `elm bench` subprocess on 2 fake CPU devices with the
fsdp x tensor mesh, and the efficiency and table arithmetic on fixture rows."""
import argparse
import os

import pytest

from experiments import scaling
from experiments.common import write_json

# End-to-end runs (CPU-sized experiments / notebook kernels): the Python 3.11 CI leg runs them.
pytestmark = pytest.mark.slow


def test_one_bench_subprocess_on_two_fake_devices():
  a = argparse.Namespace(quick=True, layers=1, batch_per_device=2, seq_len=16, steps=1, timeout=300,
                         set=["model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.vocab_size=64",
                              "model.mlp_hidden=64", "model.impl=scan", "model.dtype=float32"])
  row = scaling.bench("deltanet-340m", 2, "fsdp_tensor", a)
  assert "error" not in row, row.get("error")
  assert row["mesh_shape"] == [1, 1, 2] and row["step_ms"] > 0
  assert row["tokens_per_sec_per_device"] == row["tokens_per_sec"] / 2


def test_efficiency_and_markdown(tmp_path):
  rows = [{"model": "m", "devices": 1, "mesh": "fsdp", "tokens_per_sec_per_device": 100.0, "step_ms": 10.0,
           "batch_per_device": 8, "seq_len": 2048, "layers": 4, "mfu": 0.3, "peak_bytes_per_device": 2**31},
          {"model": "m", "devices": 2, "mesh": "data", "tokens_per_sec_per_device": 90.0, "step_ms": 11.1,
           "batch_per_device": 8, "seq_len": 2048, "layers": 4, "mfu": 0.27, "peak_bytes_per_device": None},
          {"model": "m", "devices": 2, "mesh": "fsdp", "error": "boom", "batch_per_device": 8, "seq_len": 2048,
           "layers": 4}]
  rows = scaling.efficiencies(rows)
  assert rows[0]["efficiency"] == 1.0 and abs(rows[1]["efficiency"] - 0.9) < 1e-12
  assert "efficiency" not in rows[2]
  write_json(os.path.join(tmp_path, "scaling.json"), {"meta": {"hardware": "2 x GPU", "date": "d"}, "rows": rows})
  table = scaling.markdown(str(tmp_path))
  assert "| m | 2 | data | 11.1 | 90 | 0.90 | 27.0% |  |" in table
  assert "| m | 2 | fsdp | error |" in table
