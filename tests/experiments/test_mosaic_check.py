"""experiments/mosaic_check.py on the CPU: the agreement rows and the interleaved timing rounds."""
import json
import os

import pytest

from experiments import mosaic_check


def test_rows_and_interleaved_rounds(tmp_path, monkeypatch):
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "auto")   # the script sets it per backend; restored after
  report = mosaic_check.main(["--out", str(tmp_path), "--ops", "gla_scalar", "--shape", "1x128x2x64",
                              "--check-shape", "1x64x2x64", "--backends", "triton,auto"])
  assert [(r["backend"], r["pass"]) for r in report["check"]] == [("triton", True), ("auto", True)]
  assert [r["backend"] for r in report["timing"]] == ["triton", "auto"]   # no fla row unless asked
  for row in report["timing"]:
    assert len(row["fwd_rounds"]) == len(row["fwd_bwd_rounds"]) == mosaic_check.ROUNDS
    assert row["fwd_bwd_ms"] == sorted(row["fwd_bwd_rounds"])[mosaic_check.ROUNDS // 2] > 0
  with open(os.path.join(tmp_path, "mosaic_check.json")) as f:
    assert json.load(f)["timing"] == report["timing"]


def test_unknown_backend_is_refused(tmp_path):
  with pytest.raises(SystemExit):
    mosaic_check.main(["--out", str(tmp_path), "--backends", "triton,cuda"])


def test_several_timing_shapes_without_agreement(tmp_path, monkeypatch):
  """--check-shape none and two timing shapes, one with K != V (the Rodimus anchor's form)."""
  monkeypatch.setenv("PALLAS_KERNELS_GPU", "auto")
  report = mosaic_check.main(["--out", str(tmp_path), "--ops", "gla_perdim", "--shape", "1x128x1x64x128,1x64x2x64",
                              "--check-shape", "none", "--backends", "triton"])
  assert report["check"] == []
  assert [r["shape"] for r in report["timing"]] == [[1, 128, 1, 64, 128], [1, 64, 2, 64, 64]]
  assert all(r["fwd_bwd_ms"] > 0 for r in report["timing"]), report["timing"]


@pytest.mark.parametrize("option, value", [("--shape", "8x2048x16"), ("--check-shape", "1x64x2xK")])
def test_malformed_shape_is_refused(tmp_path, capsys, option, value):
  with pytest.raises(SystemExit):
    mosaic_check.main(["--out", str(tmp_path), option, value])
  assert f"{option}: expected BxTxHxD or BxTxHxKxV" in capsys.readouterr().err
