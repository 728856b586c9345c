"""EG-MLA: a framework for studying KV-cache-efficient attention (MHA, GQA, MQA, MLA, EG-MLA).

from egmla import compose, build_model, kv_bytes_per_token
cfg = compose(["model=tiny", "attention=egmla"])
model = build_model(cfg)            # model(ids) -> logits; model.generate(ids, max_new_tokens)
kv_bytes_per_token(cfg)             # analytic KV-cache bytes per token (bf16)
"""

from .accounting import kv_bytes_per_token
from .config import build_model, compose, model_config
from .model import ConfigError

__all__ = ["ConfigError", "build_model", "compose", "kv_bytes_per_token", "model_config"]
