"""Hydra composition and the bridge from a composed config to typed dataclasses and a model."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
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
    """Compose the project's Hydra config with command-line style overrides, e.g. ["attention=egmla"].

    attention.name (and so the run name) gets a tag for each attention knob that differs from its file's
    defaults (see attention_name_tags)."""
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app: reuse its search path
            return _compose(config_name, overrides, _attention_file)
        conf = str(config_dir())
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return _compose(config_name, overrides, lambda choice: _cached_attention_file(conf, choice))
    except MissingConfigException as exc:
        options = ", ".join(exc.options or [])
        raise ConfigError(
            f"no config '{exc.missing_cfg_file}' for overrides {list(overrides)}: expected one of {options}"
        ) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot compose config with overrides {list(overrides)}: {_one_line(exc)}") from None


def _compose(config_name: str, overrides: Sequence[str], attention_file: Callable[[str], dict | None]) -> DictConfig:
    cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    choice = cfg.hydra.runtime.choices.get("attention")
    with open_dict(cfg):
        del cfg["hydra"]
    if choice and isinstance(cfg.get("attention"), DictConfig):
        _tag_attention_name(cfg, attention_file(choice))
    return cfg


def _attention_file(choice: str) -> dict | None:
    """conf/attention/<choice>.yaml as Hydra composes it (its defaults list applied), interpolations unresolved."""
    node = hydra_compose(config_name=f"attention/{choice}").get("attention")
    return None if node is None else OmegaConf.to_container(node, resolve=False)


@functools.lru_cache(maxsize=64)
def _cached_attention_file(conf: str, choice: str) -> dict | None:
    return _attention_file(choice)  # a whole Hydra composition (0.3 s): once per process and file


# ------------------------------------------------------------------------------------------------ run names
# An attention file's `name` (egmla-kv${.kv_lora_rank}-g${.gate_dim}) shows the knobs it interpolates; every other
# knob that differs from the file's own value at the model's size adds a tag, so no two configurations share a
# name and a file's defaults keep a short one. A knob without a short tag below shows as key-value.

NAME_IGNORED = ("name", "fused_expand")  # fused_expand: the same function in one fused kernel (speed, memory)
VALUE_TAGS: dict[str, dict[Any, str]] = {
    "gate_enabled": {False: "nogate", True: "gate"},
    "gate_on": {"latent": "lat", "content": "cont"},
    "gate_activation": {"sigmoid": "sig", "silu": "silu", "none": "noact"},
    "gate_norm": {"rmsnorm": "rms", "layernorm": "ln", "none": "nonorm"},
    "gate_kv": {"shared": "shkv", "separate": "sepkv"},
    "gate_rope_key": {True: "rk", False: "nork"},
    "gate_combine": {"add": "add", "multiply": "mul"},
    "gate_init": {"identity": "idinit", "normal": "nrminit"},
    "gate_norm_scope": {"vector": "vecnorm", "head": "headnorm"},
    "absorb": {True: "abs", False: "noabs"},
}
INT_TAGS = {
    "q_lora_rank": "q",
    "gate_group_size": "grp",
    "kv_lora_rank": "kv",
    "gate_dim": "g",
    "n_kv_heads": "kvh",
    "head_dim": "hd",
    "qk_nope_head_dim": "nope",
    "qk_rope_head_dim": "rope",
    "v_head_dim": "v",
}


def knob_tag(key: str, value: Any) -> str:
    """The run-name tag of attention.<key>=<value>: gate_on=latent -> lat, q_lora_rank=64 -> q64, else key-value."""
    tag = VALUE_TAGS.get(key, {}).get(value) if isinstance(value, str | bool) else None
    if tag is not None:
        return tag
    if key in INT_TAGS and isinstance(value, int) and not isinstance(value, bool):
        return f"{INT_TAGS[key]}{value}"
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return f"{key}-{re.sub(r'[^A-Za-z0-9.+]', '_', text)}"


def attention_name_tags(attention: dict[str, Any], defaults: dict[str, Any], shown: Iterable[str] = ()) -> list[str]:
    """Tags of the knobs of `attention` that differ from `defaults`, in the order of `attention`; knobs in `shown`
    (those the base name interpolates) and NAME_IGNORED have none."""
    skip = set(NAME_IGNORED) | set(shown)
    return [knob_tag(k, v) for k, v in attention.items() if k not in skip and (k not in defaults or v != defaults[k])]


def _tag_attention_name(cfg: DictConfig, file: dict | None) -> None:
    """Append to cfg.attention.name the tags of the knobs that differ from `file`'s (the chosen attention file's
    values, resolved at cfg's model size). A name set by hand (attention.name=..., or by an experiment) is kept."""
    name = cfg.attention._get_node("name")
    if name is None or not file or name._value() != file.get("name"):
        return
    defaults = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # cfg's model, data, ... for interpolations
    defaults.attention = file
    shown = re.findall(r"\$\{\.(\w+)\}", str(file["name"]))
    tags = attention_name_tags(
        OmegaConf.to_container(cfg.attention, resolve=True),
        OmegaConf.to_container(defaults.attention, resolve=True),
        shown,
    )
    if tags:
        cfg.attention.name = "-".join([cfg.attention.name, *tags])


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
