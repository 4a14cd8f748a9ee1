"""experiments/profile_ops.py: the trace reduction and one real traced target on the CPU."""
import json
import os

import pytest

from experiments import profile_ops


def _meta(pid, tid, proc, thread):
  return [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": proc}},
          {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}}]


def test_kernel_totals_keeps_device_tracks_apart_and_drops_the_host():
  events = (_meta(1, 10, "/host:CPU", "python") + _meta(2, 20, "/device:GPU:0", "Stream #13")
            + _meta(2, 21, "/device:GPU:0", "XLA Ops"))
  x = lambda pid, tid, name, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": dur}
  events += [x(1, 10, "PjitFunction", 500.0), x(2, 20, "triton_scores", 30.0), x(2, 20, "triton_scores", 10.0),
             x(2, 20, "loop_fusion", 5.0), x(2, 21, "fusion.3", 45.0), {"ph": "i", "pid": 2, "tid": 20, "name": "mark"}]
  totals = profile_ops.kernel_totals(events)
  assert set(totals) == {"/device:GPU:0 / Stream #13", "/device:GPU:0 / XLA Ops"}
  assert dict(totals["/device:GPU:0 / Stream #13"]) == {"triton_scores": [40.0, 2], "loop_fusion": [5.0, 1]}
  assert dict(totals["/device:GPU:0 / XLA Ops"]) == {"fusion.3": [45.0, 1]}


def test_kernel_totals_without_a_device_reads_the_xla_threads():
  events = _meta(1, 10, "/host:CPU", "python") + _meta(1, 11, "/host:CPU", "tf_XLAEigen/1")
  events += [{"ph": "X", "pid": 1, "tid": 10, "name": "PjitFunction", "dur": 9.0},
             {"ph": "X", "pid": 1, "tid": 11, "name": "dot_general.1", "dur": 3.0}]
  assert {k: dict(v) for k, v in profile_ops.kernel_totals(events).items()} == {
      "/host:CPU / tf_XLAEigen/1": {"dot_general.1": [3.0, 1]}}


def test_smoke_profile_writes_rows_and_reports_a_bad_target(tmp_path):
  rows, failed = profile_ops.main(["--smoke", "--targets", "moe_xla", "--iters", "2", "--top", "3",
                                   "--out", str(tmp_path)])
  assert rows and not failed
  assert all(r["target"] == "moe_xla" and r["ms"] >= 0 and 0 <= r["share"] <= 1 for r in rows)
  assert any("dot" in r["kernel"] or "fusion" in r["kernel"] for r in rows)
  saved = json.load(open(os.path.join(tmp_path, "profile_ops.json")))
  assert saved["rows"] == rows and saved["meta"]["iters"] == 2
  with pytest.raises(SystemExit):
    profile_ops.main(["--targets", "moe_xla,flash", "--out", str(tmp_path)])


def test_smoke_profile_of_the_dispatched_delta_rule(tmp_path):
  """delta_default goes through impl="pallas" (the dispatch; interpret-mode kernels on the CPU)."""
  rows, failed = profile_ops.main(["--smoke", "--targets", "delta_default", "--iters", "1", "--top", "3",
                                   "--out", str(tmp_path)])
  assert rows and not failed
  assert {r["label"] for r in rows} == {"delta pallas fwd+bwd 1x128x2x32"}


def test_hlo_sources_names_a_fusion_by_its_own_metadata_or_by_what_it_calls():
  hlo = "\n".join([
      "%fused_computation.3 (param_0: f32[8]) -> f32[8] {",
      '  %add.1 = f32[8]{0} add(%param_0, %param_0), metadata={op_name="jit(f)/vjp/cumsum/add"}',
      '  ROOT %neg.2 = f32[8]{0} negate(%add.1), metadata={op_name="jit(f)/vjp/neg"}',
      "}",
      "ENTRY %main.9 (p: f32[8]) -> f32[8] {",
      "  %loop_add_fusion = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused_computation.3",
      '  ROOT %custom-call.1 = f32[8]{0} custom-call(%loop_add_fusion), metadata={op_name="jit(f)/pallas_call"}',
      "}"])
  sources = profile_ops.hlo_sources(hlo)
  assert sources["custom-call.1"] == "jit(f)/pallas_call"
  assert sources["loop_add_fusion"] == "cumsum/add | vjp/neg"
  assert "param_0" not in sources
