from pallas_kernels.ops.gla.api import gla, gla_step
