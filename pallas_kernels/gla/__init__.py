from pallas_kernels.gla.api import gla, gla_step
