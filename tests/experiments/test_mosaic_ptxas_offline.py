"""experiments/mosaic_ptxas_offline.py up to its plugin step (which needs the CUDA plugin's wheel):
every op it names lowers on the CPU to the Mosaic GPU modules it would compile, each module's
launch giving its shared memory. The Python 3.12 CI leg: the script needs jax >= 0.11 (checked with
0.11.2 and 0.12), the Python 3.11 leg has 0.10."""
import math

import jax
import jax.numpy as jnp
import pytest

if jax.__version_info__ < (0, 11):
  pytest.skip(f"the script lowers Mosaic GPU kernels with jax >= 0.11, not {jax.__version__}", allow_module_level=True)

from experiments import mosaic_ptxas_offline as offline
from pallas_kernels.common.gla_perdim_kernels_mosaic_gpu import _chunk_grad_layout


@pytest.mark.parametrize("op, kernels", [("scores", 1), ("forward", 2), ("state_grads", 1), ("chunk_grads", 1),
                                         ("backward", 2)])
def test_each_op_lowers_to_its_kernels(op, kernels):
  modules = offline.kernel_modules(*offline.op_fn(op, 1, 128, 2, 64, 64, 64))
  assert len(modules) == kernels
  assert all(offline.dynamic_smem(module) > 0 for module in modules)


def test_shared_memory_is_the_layouts():
  """The chunk-gradient kernel's launch asks for at least its layout's buffers (one slot)."""
  per_chunk, fixed, _ = _chunk_grad_layout(64, jnp.bfloat16, False)
  nbytes = sum(math.prod(shape) * jnp.dtype(dtype).itemsize for shape, dtype, _ in per_chunk + fixed)
  (module,) = offline.kernel_modules(*offline.op_fn("chunk_grads", 1, 128, 2, 64, 64, 64))
  assert offline.dynamic_smem(module) >= nbytes
