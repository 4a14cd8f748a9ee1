"""experiments/ptxas_report.py: the Triton IR taken out of the CUDA export, one module per kernel
in launch order with its launch parameters; a --triton-path without triton is refused. (Compiling
that IR needs the triton package, which the test environment does not install.)"""
import subprocess
import sys

import jax
import pytest

from experiments import ptxas_report
from pallas_kernels.common import chunk_kernels_triton as ck

pytestmark = pytest.mark.skipif(jax.__version_info__ >= (0, 11),
                                reason="jax >= 0.11 exports for cuda only with an abstract GPU device")


@pytest.mark.parametrize("family, names", [
    ("delta", ["_wy_kernel", "_forward_kernel", "_output_kernel", "_state_grad_kernel", "_dqk_kernel",
               "_wy_grad_kernel"]),
    ("gla", ["_forward_kernel", "_output_kernel", "_state_grad_kernel", "_dqk_kernel"]),
])
def test_kernels_come_out_as_triton_ir(family, names):
  found = ptxas_report.triton_kernels(family, gated=True, segments=True, kd=32, vd=64, b=1, t=128, h=2)
  assert [f[0] for f in found] == names
  by_name = {name: (warps, stages, grid, ttir) for name, warps, stages, grid, ttir in found}
  assert by_name["_dqk_kernel"][:2] == ck.DQK_PARAMS
  assert by_name["_forward_kernel"][2] == [2, 1, 1]            # (B*H, V / value block)
  assert by_name["_dqk_kernel"][2] == [2, 2, 1]                # (B*H, chunks, K / key block)
  for name, (_, _, _, ttir) in by_name.items():
    assert f"tt.func public @{name}" in ttir and "tt.dot" in ttir, name


def test_refuses_a_path_without_triton(tmp_path):
  res = subprocess.run([sys.executable, ptxas_report.__file__, "--triton-path", str(tmp_path)],
                       capture_output=True, text=True)
  assert res.returncode == 2 and "holds no triton package" in res.stderr


def test_sass_mix_counts_opcodes_without_modifiers_or_predicates():
  sass = """
        Function : _scores_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                    /* 0x00000a00ff017b82 */
                                                                                             /* 0x000e220000000800 */
        /*01c0*/                   LDG.E.128 R4, desc[UR8][R4.64] ;                          /* 0x0000000804047981 */
        /*0780*/                   MUFU.EX2 R48, R42 ;                                       /* 0x0000002a00307308 */
        /*0790*/               @!P0 FFMA R3, R2, R5, R6 ;                                    /* 0x0000000502038223 */
        /*07a0*/                @P1 MUFU.RCP R7, R8 ;                                        /* 0x0000000800077308 */
        /*07b0*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;                    /* 0x000000100c08723c */
  """
  mix = ptxas_report.sass_mix(sass)
  assert mix["instructions"] == 6
  assert (mix["MUFU"], mix["FFMA"], mix["LDG"], mix["HMMA"], mix["HGMMA"]) == (2, 1, 1, 1, 0)
