"""Load a trained run for evaluation: `load_run(RUN_DIR) -> (model, tokenizer, cfg)`.

A run directory (what `egmla-train` writes) holds `config.yaml` (the resolved Hydra config: which model, which
attention, which tokenizer) and `checkpoints/last.ckpt` (a Lightning checkpoint whose `state_dict` holds the
Transformer's parameters under "model."). Evaluation needs no Lightning and no Hydra composition: the config is
read back with OmegaConf, the weights are copied into a plain `Transformer`.

Every way this can go wrong (no such directory, no config, no checkpoint, a truncated or foreign checkpoint,
weights of another model) raises `ConfigError` with one line that names the path and the fix.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import model_config
from ..data.tokenizer import Tokenizer, build_tokenizer
from ..model import ConfigError, ModelConfig, Transformer
from ..model.config import error_summary

STATE_PREFIX = "model."  # the LightningModule keeps the Transformer as `self.model`
RUN_DIR_HINT = "pass the run_dir of an egmla-train run (it holds config.yaml and checkpoints/last.ckpt)"


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None
) -> tuple[Transformer, Tokenizer, DictConfig]:
    """The trained model (eval mode, on `device`; "auto": the GPU if there is one), its tokenizer and the run's
    resolved config.

    run_dir: a run directory, or a .ckpt file directly (config.yaml is then read from its run directory).
    checkpoint: which checkpoint of the run: None for checkpoints/last.ckpt, a file name inside checkpoints/
        (e.g. step0000400.ckpt), or a path.
    """
    run_dir, ckpt_path = _resolve_paths(Path(run_dir), checkpoint)
    cfg = read_config(run_dir)
    mcfg = model_config(cfg)
    ckpt = _read_checkpoint(ckpt_path)
    _check_same_model(ckpt, mcfg, ckpt_path, run_dir)
    model = Transformer(mcfg)
    _load_weights(model, ckpt, ckpt_path)
    tokenizer = build_tokenizer(str(cfg.data.tokenizer))
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ConfigError(
            f"run {run_dir}: tokenizer {cfg.data.tokenizer!r} has {tokenizer.vocab_size} ids but the model only "
            f"{mcfg.vocab_size}: config.yaml's data.tokenizer does not match the trained model"
        )
    return model.to(_device(device)).eval(), tokenizer, cfg


def _resolve_paths(path: Path, checkpoint: str | Path | None) -> tuple[Path, Path]:
    """(run directory, checkpoint file) from a run directory or a checkpoint path."""
    from ..train.fsdp import is_sharded_checkpoint

    if path.is_file() or is_sharded_checkpoint(path):
        if checkpoint is not None:
            raise ConfigError(f"{path} is a checkpoint file already: pass its run directory to choose a checkpoint")
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    if not path.is_dir():
        raise ConfigError(f"run directory {path} does not exist: {RUN_DIR_HINT}")
    ckpt_dir = path / "checkpoints"
    if checkpoint is None:
        ckpt = ckpt_dir / "last.ckpt"
    else:
        ckpt = Path(checkpoint)
        if not ckpt.is_absolute() and not ckpt.exists():
            ckpt = ckpt_dir / ckpt
    if not (ckpt.is_file() or ckpt.is_dir()):
        found = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        there = f"checkpoints there: {', '.join(found)}" if found else "the run has no checkpoints: train it first"
        raise ConfigError(f"no checkpoint at {ckpt} ({there})")
    return path, ckpt


def read_config(run_dir: Path) -> DictConfig:
    """The run's resolved config.yaml (written by egmla-train before training starts)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {RUN_DIR_HINT}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # YAML and OmegaConf errors alike
        raise ConfigError(f"{path} is unreadable ({error_summary(exc)}): restore the run's config.yaml") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg or "attention" not in cfg:
        raise ConfigError(f"{path} is not an egmla run config (no model/attention groups): {RUN_DIR_HINT}")
    if cfg.get("data") is None or cfg.data.get("tokenizer") is None:
        raise ConfigError(f"{path} has no data.tokenizer: add the tokenizer the run was trained with (e.g. gpt2)")
    return cfg


def _read_checkpoint(path: Path) -> dict[str, Any]:
    from ..train.fsdp import is_sharded_checkpoint, load_sharded_weights, sharded_checkpoint_metadata
    from ..train.integrity import safe_torch_load, verify_checksum, warn_unverified

    verified = verify_checksum(path)
    try:
        if is_sharded_checkpoint(path):  # trainer=fsdp: a folder of shards, gathered here into one state_dict
            ckpt = sharded_checkpoint_metadata(path) | {"state_dict": load_sharded_weights(path)}
        else:
            ckpt = safe_torch_load(path, mmap=True)  # tensors and plain data only: never code
    except ConfigError:
        raise
    except Exception as exc:  # truncated, foreign or not a torch file: torch raises many different errors
        raise ConfigError(
            f"checkpoint {path} is unreadable ({error_summary(exc)}): pass another checkpoint "
            "(checkpoint=PATH or a file of the run's checkpoints/) or retrain"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"checkpoint {path} is not an egmla training checkpoint (no state_dict): {RUN_DIR_HINT}")
    if not verified:
        warn_unverified(path)
    return ckpt


def _check_same_model(ckpt: dict[str, Any], mcfg: ModelConfig, ckpt_path: Path, run_dir: Path) -> None:
    """The checkpoint records the model it was trained with; config.yaml must describe the same one."""
    saved = ckpt.get("egmla_model_config")
    if saved is None or saved == asdict(mcfg):
        return
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r}, config.yaml {value!r}"
        for key, value in asdict(mcfg).items()
        if saved.get(key) != value
    ]
    raise ConfigError(
        f"checkpoint {ckpt_path} was trained with another model than {run_dir / 'config.yaml'} describes "
        f"({'; '.join(diffs[:3])}): evaluate the checkpoint with its own run directory"
    )


def _load_weights(model: Transformer, ckpt: dict[str, Any], path: Path) -> None:
    state = {k[len(STATE_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}
    expected = model.state_dict()
    problems = {
        "missing": sorted(set(expected) - set(state)),
        "unexpected": sorted(set(state) - set(expected)),
        "wrong shape": sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape),
    }
    if any(problems.values()):
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in problems.items() if keys
        )
        raise ConfigError(f"checkpoint {path} does not fit the run's model ({detail}): is it from another run?")
    model.load_state_dict(state)


def _device(device: str | torch.device) -> torch.device:
    """torch.device of a setting; "auto": the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} is not available (no CUDA GPU here): use device=cpu")
    return device
