"""Registers, spills and shared memory of the fused Triton-backend kernels, without a GPU.

    python experiments/ptxas_report.py --triton-path DIR [--family delta|gla|gla_perdim] [--gated] [--kd 128 --vd 128]
                                       [--params '{"DQK_PARAMS": [8, 1]}'] [--out DIR]

Exports the fused forward+backward for CUDA (jax < 0.11: newer jax exports for CUDA only with an
abstract GPU device), takes the Triton IR of each kernel out of its custom call, compiles it for
sm_90a with the `triton` package found under --triton-path (e.g. `pip install --target DIR
triton==3.6.0`; a child process, so that it never meets jax's own Triton) at the kernel's
num_warps / num_stages, reads `ptxas -v` and counts the SASS instructions of the cubin by class
(`sass_mix`). Spills, shared memory per block and the static instruction mix predict where a
kernel loses time before any device time is spent; they are not a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_COMPILE_ONE = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
with tempfile.TemporaryDirectory() as tmp:
  ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
  with open(ptx, "w") as f:
    f.write(k.asm["ptx"])
  info = subprocess.run([os.path.join(bin_dir, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o", cubin],
                        capture_output=True, text=True, check=True).stderr
  sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                        check=True).stdout
regs = re.search(r"Used (\d+) registers", info)
spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
print(json.dumps({"triton": triton.__version__, "registers": int(regs.group(1)),
                  "spill_store_bytes": int(spill.group(1)), "spill_load_bytes": int(spill.group(2)),
                  "shared_bytes": k.metadata.shared, "sass": sass}))
"""

# The instruction classes that say where a kernel's time can go: MUFU for the transcendentals,
# the float pipes, HGMMA (wgmma) and HMMA (mma.sync) for the tensor cores, global and shared memory
# (LDGSTS: cp.async, LDSM: ldmatrix, UTMALDG: TMA loads).
SASS_CLASSES = ("MUFU", "FFMA", "FMUL", "FADD", "HGMMA", "HMMA", "LDG", "STG", "LDS", "STS", "LDGSTS", "LDSM",
                "UTMALDG", "BAR", "BRA")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def sass_mix(sass: str) -> dict:
  """Static instruction counts of `cuobjdump -sass` text (each loop body counted once): the total
  and each class of SASS_CLASSES, by opcode without its modifiers (MUFU.EX2 counts as MUFU)."""
  ops = _SASS_OP.findall(sass)
  return {"instructions": len(ops), **{c: ops.count(c) for c in SASS_CLASSES}}


def triton_kernels(family="delta", gated=True, segments=False, kd=128, vd=128, dtype="bfloat16",
                   b=2, t=256, h=2):
  """[(name, num_warps, num_stages, grid, TTIR text)] of every Triton custom call in the fused
  forward+backward exported for CUDA."""
  import jax
  import jax.numpy as jnp
  from jax import export
  from jax._src.interpreters import mlir as jax_mlir
  from jax._src.lib import triton as jax_triton
  from jax._src.lib.mlir import ir

  from pallas_kernels.ops.delta_rule.pallas import delta_rule_fused
  from pallas_kernels.ops.gla.pallas import gla_fused

  if jax.__version_info__ >= (0, 11):
    raise RuntimeError(f"ptxas_report needs jax < 0.11 to export for CUDA without a GPU (this is jax {jax.__version__})")
  dt = jnp.dtype(dtype)

  def loss(q, k, v, beta, g, s0, seg):
    common = dict(scale=kd ** -0.5, s0=s0, segment_ids=seg if segments else None, chunk_size=64, interpret=False)
    if family == "delta":
      o, s = delta_rule_fused(q, k, v, beta, g if gated else None, **common)
    else:
      o, s = gla_fused(q, k, v, g if gated else None, **common)
    return o.astype(jnp.float32).sum() + s.sum()

  spec = lambda *s, d=dt: jax.ShapeDtypeStruct(s, d)
  g = spec(b, t, h, kd) if family == "gla_perdim" else spec(b, t, h)
  args = (spec(b, t, h, kd), spec(b, t, h, kd), spec(b, t, h, vd), spec(b, t, h), g,
          spec(b, h, kd, vd, d=jnp.float32), spec(b, t, d=jnp.int32))
  # the loss's value too, as a training step: under jax.grad alone the split-off `_output_kernel`
  # is dropped (O's value is not needed for the gradients)
  exported = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))), platforms=["cuda"],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
                           )(*args)
  ctx = jax_mlir.make_ir_context()
  jax_triton.dialect.register_dialect(ctx)
  found = []
  with ctx:
    module = ir.Module.parse(exported.mlir_module())

    def walk(op):
      for region in op.regions:
        for block in region.blocks:
          for child in block.operations:
            if (child.operation.name == "stablehlo.custom_call"
                and "triton" in str(child.attributes["call_target_name"])):
              cfg = {a.name: a.attr for a in child.attributes["mhlo.backend_config"]}
              as_int = lambda key: int(str(cfg[key]).split(":")[0])
              ttir = str(ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes))
              found.append((str(cfg["name"]).strip('"'), as_int("num_warps"), as_int("num_stages"),
                            [as_int(f"grid_{a}") for a in "xyz"], ttir))
            walk(child.operation)
    walk(module.operation)
  return found


def compile_report(kernels, triton_path):
  """ptxas figures of each kernel, compiled in a child process with triton from `triton_path`."""
  env = dict(os.environ, PYTHONPATH=triton_path)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, warps, stages, grid, ttir in kernels:
      path = os.path.join(tmp, f"{name}.ttir")
      with open(path, "w") as f:
        f.write(ttir)
      row = {"kernel": name, "num_warps": warps, "num_stages": stages, "grid": grid}
      res = subprocess.run([sys.executable, "-c", _COMPILE_ONE, path, str(warps), str(stages)],
                           capture_output=True, text=True, env=env)
      if res.returncode == 0:
        out = json.loads(res.stdout.strip().splitlines()[-1])
        row.update(out, sass=sass_mix(out["sass"]))
      else:
        row["error"] = res.stderr.strip()[-1500:]
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--triton-path", required=True, help="a folder holding the triton package (pip install --target)")
  ap.add_argument("--family", choices=("delta", "gla", "gla_perdim"), default="delta",
                  help="gla: scalar decay with --gated; gla_perdim: per-dimension decay")
  ap.add_argument("--gated", action="store_true")
  ap.add_argument("--segments", action="store_true")
  ap.add_argument("--kd", type=int, default=128)
  ap.add_argument("--vd", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--params", default=None, help="JSON of chunk_kernels_triton constants to set first")
  ap.add_argument("--out", default=None, help="write ptxas_report.json here")
  args = ap.parse_args()
  if not os.path.isdir(os.path.join(args.triton_path, "triton")):
    ap.error(f"--triton-path {args.triton_path!r} holds no triton package")
  from pallas_kernels.common import chunk_kernels_triton
  params = json.loads(args.params) if args.params else {}
  for name, value in params.items():
    if not hasattr(chunk_kernels_triton, name):
      ap.error(f"--params: chunk_kernels_triton has no constant {name!r}")
    setattr(chunk_kernels_triton, name, tuple(value) if isinstance(value, list) else value)
  config = {"family": args.family, "gated": args.gated, "segments": args.segments, "kd": args.kd,
            "vd": args.vd, "dtype": args.dtype, "params": params}
  rows = compile_report(triton_kernels(args.family, args.gated, args.segments, args.kd, args.vd, args.dtype),
                        args.triton_path)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ptxas_report.json"), "w") as f:
      json.dump({"config": config, "target": "sm_90a", "kernels": rows}, f, indent=1)
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
