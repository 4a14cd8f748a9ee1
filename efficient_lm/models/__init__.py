"""The causal LM, its decode caches and sampling."""
from efficient_lm.models.cache import decode_state_bytes, decode_state_growth, tree_bytes
from efficient_lm.models.generate import generate, sample_logits
from efficient_lm.models.lm import LM, Block, weight_decay_mask

__all__ = ["LM", "Block", "decode_state_bytes", "decode_state_growth", "generate", "sample_logits",
           "tree_bytes", "weight_decay_mask"]
