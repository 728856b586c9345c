"""Hydra composition and the bridge from a composed config to typed dataclasses and a model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .model import ConfigError, ModelConfig, Transformer, model_config_from_dicts


def config_dir() -> Path:
    """The conf/ tree: $EGMLA_CONFIG_DIR if set, else the checkout's conf/ beside src/."""
    path = Path(os.environ.get("EGMLA_CONFIG_DIR") or Path(__file__).resolve().parents[2] / "conf")
    if not (path / "train.yaml").is_file():
        raise ConfigError(
            f"config directory {path} has no train.yaml: install egmla from a checkout (pip install -e .) "
            "or set EGMLA_CONFIG_DIR to its conf/ folder"
        )
    return path


def _one_line(exc: Exception) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the project's Hydra config with command-line style overrides, e.g. ["attention=egmla"]."""
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app: reuse its search path
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except MissingConfigException as exc:
        options = ", ".join(exc.options or [])
        raise ConfigError(
            f"no config '{exc.missing_cfg_file}' for overrides {list(overrides)}: expected one of {options}"
        ) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot compose config with overrides {list(overrides)}: {_one_line(exc)}") from None


def _container(cfg: Any, key: str) -> dict[str, Any]:
    node = cfg.get(key)
    if node is None:
        raise ConfigError(f"config has no '{key}' group: add {key}=<option> to the overrides")
    try:
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve '{key}': {_one_line(exc)}") from None


def model_config(cfg: DictConfig | dict | ModelConfig) -> ModelConfig:
    """The validated ModelConfig of a composed config (its `model` and `attention` groups)."""
    if isinstance(cfg, ModelConfig):
        return cfg
    return model_config_from_dicts(_container(cfg, "model"), _container(cfg, "attention"))


def build_model(cfg: DictConfig | dict | ModelConfig) -> Transformer:
    """The nn.Module a composed config describes: model(ids) -> logits, model.generate(...)."""
    return Transformer(model_config(cfg))
