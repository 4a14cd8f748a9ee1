"""Sequence mixers. Each has `__call__(x_BTD, seg_BT, pos_BT) -> y_BTD` (training),
`prefill(x_BTD, pos_BT, max_len) -> (y_BTD, cache)`, `step(x_BD, cache, pos) -> (y_BD, cache)`
(the explicit one-token form, calling the `*_step` ops) and `init_cache(batch_size, max_len)`."""
from efficient_lm.layers.mixers.deltanet import DeltaNet
from efficient_lm.layers.mixers.dijiang import DiJiang
from efficient_lm.layers.mixers.gla import GLA
from efficient_lm.layers.mixers.linear_attention import LinearAttention
from efficient_lm.layers.mixers.rodimus import Rodimus

__all__ = ["DeltaNet", "DiJiang", "GLA", "LinearAttention", "Rodimus"]
