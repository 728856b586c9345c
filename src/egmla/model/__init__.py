"""Pure PyTorch model code: configuration dataclasses, attention variants, decode caches, the transformer."""

from .cache import DecodeCache, LayerCache
from .config import AttentionConfig, ConfigError, ModelConfig, model_config_from_dicts
from .transformer import Transformer

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "DecodeCache",
    "LayerCache",
    "ModelConfig",
    "Transformer",
    "model_config_from_dicts",
]
