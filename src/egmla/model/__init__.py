"""Pure PyTorch model code: configuration dataclasses, attention variants, decode caches, the transformer."""

from .cache import DecodeCache, LayerCache
from .config import AttentionConfig, ConfigError, ModelConfig, model_config_from_dicts
from .loss import linear_cross_entropy
from .sampling import sample_next_token
from .transformer import Transformer

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "DecodeCache",
    "LayerCache",
    "ModelConfig",
    "linear_cross_entropy",
    "Transformer",
    "model_config_from_dicts",
    "sample_next_token",
]
