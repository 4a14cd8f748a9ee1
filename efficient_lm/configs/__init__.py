"""Model configs: the `ModelConfig` dataclass, its validation, and the preset registry."""
from efficient_lm.configs.base import (BLOCK_KINDS, LAYER_KINDS, ModelConfig, at_layers, every_other,
                                       validate)
from efficient_lm.configs.presets import PRESETS, get_config, list_presets

__all__ = ["BLOCK_KINDS", "LAYER_KINDS", "ModelConfig", "PRESETS", "at_layers", "every_other",
           "get_config", "list_presets", "validate"]
