"""The training settings as typed dataclasses, checked in one place.

`Settings.from_config(cfg)` turns a composed config into one dataclass per group (`optim`, `train`, `data`,
`trainer`, `eval`, plus the model's own `ModelConfig`) and checks every value and every combination, each bad one
a one-line ConfigError naming the key, the value and what is valid. The fields carry no defaults: each value comes
from conf/ (the YAML files are the one place where defaults and their meaning are written); a key missing from
the config, an unknown key, a wrong type or an out-of-range value is refused here, before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import model_config
from ..eval.run import EvalSettings
from ..model import ConfigError, ModelConfig
from ..model.config import check_choice, check_int, check_positive_int, reject
from .budget import Budget, token_count, world_size
from .fsdp import AC_MODES, COMPILE_SCOPES
from .schedule import SCHEDULES

STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp2")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
LOGGERS = ("csv", "wandb")


# ------------------------------------------------------------------------------------------------ value checks


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_number(
    key: str, value: Any, low: float, high: float | None = None, open_low: bool = False, valid: str = ""
) -> None:
    """A number >= low (> low with open_low) and <= high; `valid` words the range for the message."""
    if not (_is_number(value) and (value > low if open_low else value >= low) and (high is None or value <= high)):
        reject(key, value, valid or f"expected a number in [{low}, {high}]")


def check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        reject(key, value, "expected true or false")


def check_optional_str(key: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        reject(key, value, "expected a string or null")


def _plain(node: Any, group: str) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise ConfigError(f"{group} is {node!r}: expected a mapping of settings (select an option: {group}=NAME)")
    return dict(node)


def _from_dict(cls: type, node: Any, group: str):
    """cls(**node) once node holds exactly cls's fields, then cls.check()."""
    values = _plain(node, group)
    known = [f.name for f in fields(cls)]
    if unknown := [key for key in values if key not in known]:
        raise ConfigError(f"{group}.{unknown[0]} is not a known key: expected one of {', '.join(sorted(known))}")
    if missing := [key for key in known if key not in values]:
        key = f"{group}.{missing[0]}"
        raise ConfigError(f"{key} is missing: add it to the {group} group's YAML (or pass +{key}=VALUE)")
    settings = cls(**values)
    settings.check()
    return settings


# ------------------------------------------------------------------------------------------------ groups
# Each field's meaning, with its default, is written beside it in conf/ (the file named in the class docstring).


@dataclass(frozen=True)
class OptimConfig:
    """conf/optim/adamw.yaml: AdamW with warmup, then a schedule to min_lr_ratio x lr."""

    name: str
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    min_lr_ratio: float
    decay_fraction: float
    grad_clip: float
    fused: bool | str

    @classmethod
    def from_dict(cls, node: Any) -> OptimConfig:
        values = _plain(node, "optim")
        if isinstance(values.get("betas"), Sequence) and not isinstance(values["betas"], str):
            values["betas"] = tuple(values["betas"])
        return _from_dict(cls, values, "optim")

    def check(self) -> None:
        check_choice("optim.name", self.name, ("adamw",))
        check_number("optim.lr", self.lr, 0, open_low=True, valid="expected a positive learning rate")
        betas = self.betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            shown = list(betas) if isinstance(betas, tuple) else betas
            reject("optim.betas", shown, "expected two numbers in [0, 1), e.g. [0.9, 0.95]")
        check_number("optim.eps", self.eps, 0, open_low=True, valid="expected a small positive number such as 1e-8")
        check_number("optim.weight_decay", self.weight_decay, 0, valid="expected a number >= 0 (0: no decay)")
        check_int("optim.warmup_steps", self.warmup_steps, minimum=0)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        check_number("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("optim.decay_fraction", self.decay_fraction, 0, 1)
        check_number("optim.grad_clip", self.grad_clip, 0, valid="expected a max gradient norm >= 0 (0: off)")
        if self.fused != "auto" and not isinstance(self.fused, bool):
            reject("optim.fused", self.fused, "expected auto, true or false")


@dataclass(frozen=True)
class TrainConfig:
    """conf/train.yaml's `train:` block: the run's length, its validation, logging and checkpoint intervals."""

    max_steps: int
    max_tokens: int | None
    global_batch_tokens: int | None
    val_every: int
    val_batches: int
    log_every: int
    ckpt_every: int
    keep_checkpoints: int
    compile: bool
    fused_loss: bool
    compile_scope: str
    activation_checkpointing: str
    profile_steps: list[int] | None

    @classmethod
    def from_dict(cls, node: Any) -> TrainConfig:
        return _from_dict(cls, node, "train")

    def check(self) -> None:
        for key in ("max_steps", "val_every", "log_every", "ckpt_every", "val_batches"):
            check_positive_int(f"train.{key}", getattr(self, key))
        token_count("max_tokens", self.max_tokens)
        token_count("global_batch_tokens", self.global_batch_tokens)
        keep = self.keep_checkpoints
        if isinstance(keep, bool) or not isinstance(keep, int) or not (keep >= 1 or keep == -1):
            reject(
                "train.keep_checkpoints",
                self.keep_checkpoints,
                "expected an integer >= 1 (a crashed run resumes from the newest) or -1 (keep all)",
            )
        check_bool("train.compile", self.compile)
        check_bool("train.fused_loss", self.fused_loss)
        check_choice("train.compile_scope", self.compile_scope, COMPILE_SCOPES)
        check_choice("train.activation_checkpointing", self.activation_checkpointing, AC_MODES)
        steps = self.profile_steps
        if steps is not None and not (
            isinstance(steps, Sequence)
            and len(steps) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
            and 1 <= steps[0] <= steps[1]
        ):
            reject(
                "train.profile_steps",
                steps,
                "expected null or [first, last], optimizer steps with 1 <= first <= last, e.g. [300,304]",
            )


@dataclass(frozen=True)
class DataConfig:
    """conf/data/*.yaml (embedded.yaml comments every key): one source, its tokenizer and the batches it makes.

    Every data option carries the same keys; those a source does not use are null (`path` for local files,
    `data_files` for a hub dataset, `holdout_every` for a source with a validation split, ...)."""

    name: str
    builder: str | None
    path: str | None
    config_name: str | None
    data_files: Any  # a path or glob, a list of them, or {split: path or glob}; null for a hub dataset
    train_split: str
    val_split: str
    holdout_every: int | None
    text_field: str | None
    token_field: str | None
    tokenizer: str
    seq_len: int
    batch_size: int
    num_workers: int
    shuffle_window: int
    fingerprint: str | None

    @classmethod
    def from_dict(cls, node: Any) -> DataConfig:
        return _from_dict(cls, node, "data")

    def check(self) -> None:
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            reject("data.tokenizer", self.tokenizer, "use gpt2, bytes, a hub name or a local directory")
        check_positive_int("data.seq_len", self.seq_len)
        check_positive_int("data.batch_size", self.batch_size)
        check_int("data.num_workers", self.num_workers, minimum=0)
        check_int("data.shuffle_window", self.shuffle_window, minimum=0)
        if self.holdout_every is not None:
            check_int("data.holdout_every", self.holdout_every, minimum=2)
        for key in ("builder", "path", "config_name", "text_field", "token_field", "fingerprint"):
            check_optional_str(f"data.{key}", getattr(self, key))
        for key in ("name", "train_split", "val_split"):
            if not isinstance(getattr(self, key), str):
                reject(f"data.{key}", getattr(self, key), "expected a string")


@dataclass(frozen=True)
class TrainerConfig:
    """conf/trainer/*.yaml: the hardware, the distribution strategy and the precision (Lightning's Trainer)."""

    accelerator: str
    devices: int | str | list[int]  # a count, -1 or auto (every GPU), or a list of device indices
    num_nodes: int
    strategy: str
    precision: str
    accumulate_grad_batches: int
    reshard_after_forward: bool | None = None  # FSDP2 only: conf/trainer/fsdp.yaml sets it, the others leave it out

    @classmethod
    def from_dict(cls, node: Any) -> TrainerConfig:
        values = _plain(node, "trainer")
        values.setdefault("reshard_after_forward", None)
        return _from_dict(cls, values, "trainer")

    def check(self) -> None:
        check_choice("trainer.accelerator", self.accelerator, ACCELERATORS)
        check_choice("trainer.strategy", self.strategy, STRATEGIES)
        world_size(dataclasses.asdict(self))  # trainer.devices and trainer.num_nodes, as Lightning reads them
        check_positive_int("trainer.accumulate_grad_batches", self.accumulate_grad_batches)
        if str(self.precision).startswith("16"):
            raise ConfigError(
                f"trainer.precision={self.precision} is not supported (fp16 needs loss scaling): use bf16-mixed"
            )
        if self.strategy == "fsdp2" and not isinstance(self.reshard_after_forward, bool):
            reject(
                "trainer.reshard_after_forward",
                self.reshard_after_forward,
                "trainer.strategy=fsdp2 needs true or false (trainer=fsdp sets it)",
            )


# ------------------------------------------------------------------------------------------------ the whole run


@dataclass(frozen=True)
class Settings:
    """Every group of a composed config, typed and checked, groups against each other included."""

    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig
    trainer: TrainerConfig
    eval: EvalSettings
    logger: str  # logger.name (the wandb option's keys go to WandbLogger as they are)
    seed: int

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        """The checked settings of a composed config; a missing `???` value, a bad value or a bad combination
        raises ConfigError. Reads the config, writes nothing."""
        try:  # resolved once; each group below reads its part of this plain copy
            plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except Exception as exc:
            raise ConfigError(f"config is incomplete: {str(exc).splitlines()[0]}") from None
        check_int("seed", plain.get("seed"), minimum=0)
        logger = plain["logger"].get("name") if isinstance(plain.get("logger"), dict) else None
        check_choice("logger.name", logger, LOGGERS)
        settings = cls(
            model=model_config(plain),
            optim=OptimConfig.from_dict(plain.get("optim")),
            train=TrainConfig.from_dict(plain.get("train")),
            data=DataConfig.from_dict(plain.get("data")),
            trainer=TrainerConfig.from_dict(plain.get("trainer")),
            eval=EvalSettings.from_dict(plain["eval"] if plain.get("eval") is not None else {}),
            logger=logger,
            seed=plain["seed"],
        )
        settings.check()
        return settings

    def check(self) -> None:
        """What one group's values cannot settle alone."""
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}: "
                "lower one or raise the other"
            )
        if self.trainer.strategy == "fsdp2" and self.eval.tasks:
            raise ConfigError(
                "eval with trainer=fsdp is not supported (a sharded model needs every rank): train with eval=none, "
                "then run egmla-eval checkpoint=RUN_DIR on the sharded checkpoint"
            )

    def with_budget(self, budget: Budget) -> Settings:
        """These settings with the steps and the accumulation a token budget derived (apply_budget)."""
        return dataclasses.replace(
            self,
            train=dataclasses.replace(self.train, max_steps=budget.max_steps),
            trainer=dataclasses.replace(self.trainer, accumulate_grad_batches=budget.accumulation),
        )
