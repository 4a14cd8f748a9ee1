"""Linear-attention recurrences in four agreeing forms: scan reference, chunked XLA, Pallas, one-token step.

Shape legend: B batch, T time, H heads, K key width, V value width; q, k [B, T, H, K],
v [B, T, H, V], per-token scalars [B, T, H], states [B, H, K, V] float32.
"""
from pallas_kernels import _compat

_compat.avoid_cpu_scheduler_deadlock()

from pallas_kernels.ops.delta_rule import delta_rule, delta_rule_step
from pallas_kernels.ops.gla import gla, gla_step

__all__ = ["gla", "gla_step", "delta_rule", "delta_rule_step"]
