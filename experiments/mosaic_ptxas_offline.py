"""Registers, spills and shared memory of the Mosaic GPU kernels of one op, on a machine without a GPU.

    python experiments/mosaic_ptxas_offline.py chunk_grads [--shape 8,2048,16,128,128] [--chunk 64]

The op is lowered for CUDA as on CPU (`lower(lowering_platforms=("cuda",))`); each `mosaic_gpu_v2`
custom call's serialized module then goes through `MosaicGpuCompile` of the CUDA PJRT plugin
(jax-cuda13-pjrt of jax's own version, fetched with `pip download` into CACHE if not installed):
the plugin's own pass pipeline, LLVM NVPTX back end and options, the very code the GPU runs at
compile time. jaxlib alone cannot: it links no NVPTX back end and registers no LLVM conversion
passes. The compile asks the driver for the device's compute capability, so a ten-line fake
libcuda.so.1 (built here with gcc, loaded first) answers 9.0. With MOSAIC_GPU_DUMP_PTX set, the
plugin prints the PTX; then the compile fails at the host JIT (no Mosaic runtime library loaded),
which is expected. The PTX goes through `ptxas -arch=sm_90a -v` with the plugin's own flags.
Shared memory: the launch's dynamic shared memory (the module's gpu.launch) + ptxas' static.

Limits: H100 only (sm_90a: the Python lowering on CPU assumes compute capability 9.0, the fake
driver says 9.0); the gla_perdim ops only (op_fn); the plugin must match jax's version. Here the
plugin ran `ptxas` from PATH (CUDA 13.0) with these flags, as it would on the GPU machine, where
the PATH or toolkit it finds may hold another ptxas version: counts can differ by that alone.
Against run 48's device log (H200, jax 0.11.2), the same kernels: with jax 0.12 registers within
one (scores 208 here, 209 there), spills 32 B fewer (chunk_grad 12 against 44); with jax 0.11.2
and its plugin in a venv of their own (`pip install jax==0.11.2 jaxlib==0.11.2`), as on the GPU
machine, chunk_grad's 255 registers and 44 B of spills, the device's own.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile

import jax
import jax._src.pallas.mosaic_gpu.pallas_call_registration  # registers the CUDA lowering
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir, passmanager
from jax.experimental.mosaic.gpu import dialect as mgpu_dialect

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.common import gla_perdim_kernels_mosaic_gpu as G

CACHE = os.environ.get("MOSAIC_PTXAS_CACHE", "/tmp/mosaic_ptxas_offline")
PTXAS = os.environ.get("PTXAS", "ptxas")
FAKE_CUDA = r"""
typedef int R;
R cuInit(unsigned f) { return 0; }
R cuDriverGetVersion(int *v) { *v = 13000; return 0; }
R cuCtxGetDevice(int *d) { *d = 0; return 0; }
R cuDeviceGet(int *d, int o) { *d = 0; return 0; }
R cuDeviceGetCount(int *n) { *n = 1; return 0; }
R cuDeviceGetAttribute(int *v, int attr, int dev) { *v = attr == 75 ? 9 : 0; return 0; }  /* cc 9.0 */
R cuGetErrorString(R r, const char **s) { *s = "fake libcuda"; return 0; }
R cuGetErrorName(R r, const char **s) { *s = "FAKE"; return 0; }
"""


def op_fn(op, b, t, h, kd, vd, chunk):
  """(function, argument specs) of a named op of `gla_perdim_kernels_mosaic_gpu`."""
  s, bf, f32, n = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32, t // chunk
  q, cum_g, v = s((b, t, h, kd), bf), s((b, t, h, kd), f32), s((b, t, h, vd), bf)
  state, states = s((b * h, kd, vd), f32), s((b * h, n, kd, vd), bf)
  decayed = (s((b * h, n, chunk, chunk), bf), q, q, s((b * h, n, kd), f32))
  kw = {"scale": kd ** -0.5, "chunk": chunk}
  return {
      "scores": (lambda q, k, g: G.scores(q, k, g, None, **kw), (q, q, cum_g)),
      "forward": (lambda q, k, v, g, s0: G.forward(q, k, v, g, s0, store_states=True, **kw), (q, q, v, q, state)),
      "state_grads": (lambda d, do, ds: G.state_grads(d, do, ds, **kw), (decayed, v, state)),
      "chunk_grads": (lambda *a: G.chunk_grads(*a, **kw), (q, q, v, cum_g, v, states, states)),
      "backward": (lambda q, k, v, g, saved, do, ds: G.backward(q, k, v, g, saved, do, ds, **kw),
                   (q, q, v, q, (states, decayed, cum_g), v, state)),
  }[op]


def kernel_modules(fn, args):
  """The serialized Mosaic GPU module of every custom call in fn's CUDA lowering."""
  module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
  found = []

  def walk(op):
    if op.name == "stablehlo.custom_call" and ir.StringAttr(op.attributes["call_target_name"]).value == "mosaic_gpu_v2":
      found.append(ir.StringAttr(ir.DictAttr(op.attributes["mhlo.backend_config"])["module"]).value_bytes)
    return ir.WalkResult.ADVANCE
  module.operation.walk(walk)
  return found


def dynamic_smem(module_bytes):
  """The gpu.launch's dynamic shared memory size (bytes), from the deserialized module."""
  ctx = mlir.make_ir_context()
  ctx.allow_unregistered_dialects = True
  mgpu_dialect.register_dialect(ctx)
  sizes = []
  with ctx:
    module = ir.Module.parse(module_bytes)
    passmanager.PassManager.parse("builtin.module(mosaic_gpu-serde{serialize=false})").run(module.operation)

    def walk(op):
      if op.name == "gpu.launch":
        sizes.append(ir.IntegerAttr(op.operands[-1].owner.attributes["value"]).value)
      return ir.WalkResult.ADVANCE
    module.operation.walk(walk)
  return sizes[0]


def plugin_compile():
  """MosaicGpuCompile of the CUDA PJRT plugin, behind the fake libcuda."""
  os.makedirs(CACHE, exist_ok=True)
  fake = os.path.join(CACHE, "libcuda.so.1")
  if not os.path.exists(fake):
    src = os.path.join(CACHE, "fake_cuda.c")
    pathlib.Path(src).write_text(FAKE_CUDA)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", fake, src], check=True)
  ctypes.CDLL(fake, mode=ctypes.RTLD_GLOBAL)   # the plugin's dlopen("libcuda.so.1") finds this one
  try:
    import jax_plugins.xla_cuda13 as plugin
    path = plugin._get_library_path()
  except ImportError:
    path = os.path.join(CACHE, "xla_cuda_plugin.so")
    if not os.path.exists(path):
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", CACHE,
                      f"jax-cuda13-pjrt=={jax.__version__}"], check=True)
      with zipfile.ZipFile(glob.glob(os.path.join(CACHE, "jax_cuda13_pjrt-*.whl"))[0]) as whl:
        pathlib.Path(path).write_bytes(whl.read("jax_plugins/xla_cuda13/xla_cuda_plugin.so"))
  fn = ctypes.CDLL(path).MosaicGpuCompile
  fn.argtypes, fn.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_void_p
  return fn


@contextlib.contextmanager
def redirect(fd, path):
  """What C++ writes to fd (1: std::cout) into a file."""
  sys.stdout.flush()
  saved, file_fd = os.dup(fd), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  os.dup2(file_fd, fd)
  try:
    yield
  finally:
    os.dup2(saved, fd)
    os.close(file_fd)
    os.close(saved)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("op", choices=["scores", "forward", "state_grads", "chunk_grads", "backward"])
  ap.add_argument("--shape", default="8,2048,16,128,128", help="B,T,H,K,V")
  ap.add_argument("--chunk", type=int, default=64)
  a = ap.parse_args()
  b, t, h, kd, vd = map(int, a.shape.split(","))
  modules = kernel_modules(*op_fn(a.op, b, t, h, kd, vd, a.chunk))
  compile_fn, tmp = plugin_compile(), tempfile.mkdtemp(prefix="mosaic_ptxas_")
  os.environ["MOSAIC_GPU_DUMP_PTX"] = "1"
  print(f"{a.op} B,T,H,K,V={a.shape} chunk {a.chunk}: {len(modules)} kernel(s), sm_90a, {PTXAS}")
  print(f"{'kernel':44s} {'regs':>5s} {'spill st':>9s} {'spill ld':>9s} {'stack':>6s} {'smem dyn':>9s} {'smem st':>8s}")
  for i, mod in enumerate(modules):
    ptx = os.path.join(tmp, f"kernel{i}.ptx")
    with redirect(1, ptx), redirect(2, ptx + ".log"):
      compile_fn(mod, len(mod))   # fails after the PTX dump, at the host JIT: expected
    text = pathlib.Path(ptx).read_text()
    text = text[text.index("//\n// Generated by LLVM NVPTX"):]
    pathlib.Path(ptx).write_text(text)
    out = subprocess.run([PTXAS, "-arch=sm_90a", "--warn-on-spills", "-v", "--generate-line-info", ptx,
                          "-o", ptx + ".cubin"], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    name = re.search(r"entry function '([^']+)'", log).group(1)
    stack, st, ld = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                       log).groups())
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    smem = re.search(r"(\d+) bytes smem", log)
    print(f"{name:44s} {regs:5d} {st:9d} {ld:9d} {stack:6d} {dynamic_smem(mod):9d} {int(smem.group(1)) if smem else 0:8d}")
  print(f"PTX and ptxas inputs: {tmp}")


if __name__ == "__main__":
  main()
