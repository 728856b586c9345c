"""The typed training settings (egmla.train.settings): every option of conf/ reads into them, their fields take
every value from the YAML, and a bad value, an unknown key or a resume the data cannot continue is refused by
egmla-train in one line before anything is written."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import overrides, run_training
from egmla import ConfigError, compose
from egmla.config import config_dir
from egmla.eval.run import EvalSettings
from egmla.train.main import main
from egmla.train.settings import DataConfig, OptimConfig, Settings, TrainConfig, TrainerConfig


def _error(capsys, argv: list[str]) -> str:
    """egmla-train's one error line for `argv` (exit status 2, nothing on stderr besides it)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("egmla-train: error: "), err
    return err[0]


# Each gave a traceback (the first six) or was silently accepted (the last five) before the settings were typed.
INVALID = [
    ("optim.lr=abc", "optim.lr='abc' is invalid: expected a positive learning rate"),
    ("optim.betas=[2.0,0.999]", "optim.betas=[2.0, 0.999] is invalid: expected two numbers in [0, 1)"),
    ("optim.eps=-1e-8", "optim.eps=-1e-08 is invalid: expected a small positive number"),
    ("data.num_workers=-1", "data.num_workers=-1 is invalid: expected an integer >= 0"),
    ("trainer.devices=0", "trainer.devices=0 is invalid for trainer.accelerator=cpu: expected a number of devices"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is invalid: expected a positive"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5 is invalid: expected an integer >= 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2 is invalid: expected a number in [0, 1]"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 is invalid: expected a number >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1 is invalid: expected a max gradient norm >= 0 (0: off)"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 is invalid: expected an integer >= 1"),
]
MORE = [
    ("+optim.momentum=0.9", "optim.momentum is not a known key: expected one of betas, decay_fraction, eps"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] is invalid"),
    ("optim.fused=maybe", "optim.fused='maybe' is invalid: expected auto, true or false"),
    ("train.compile=yes", "train.compile='yes' is invalid: expected true or false"),
    ("data.seq_len=abc", "data.seq_len='abc' is invalid: expected a positive integer"),
    ("data.holdout_every=1", "data.holdout_every=1 is invalid: expected an integer >= 2"),
    ("trainer.accelerator=tpu", "trainer.accelerator='tpu' is invalid: expected one of auto, cpu, gpu"),
    ("trainer.precision=16-mixed", "trainer.precision=16-mixed is not supported"),
    ("trainer.strategy=fsdp2", "trainer.reshard_after_forward=None is invalid: trainer.strategy=fsdp2 needs true"),
    ("logger.name=tensorboard", "logger.name='tensorboard' is invalid: expected one of csv, wandb"),
    ("seed=-1", "seed=-1 is invalid: expected an integer >= 0"),
]


@pytest.mark.parametrize(("override", "message"), INVALID + MORE, ids=[o for o, _ in INVALID + MORE])
def test_an_invalid_setting_is_one_line_and_writes_nothing(corpus, tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    assert message in _error(capsys, [*overrides(corpus, run_dir), override])
    assert not run_dir.exists()


def _options(group: str) -> list[str]:
    root = config_dir() / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


@pytest.mark.parametrize(
    "selection",
    [
        *([f"data={o}", "model=120m"] for o in _options("data")),  # seq_len 2048 needs its max_seq_len
        *([f"trainer={o}"] for o in _options("trainer")),
        *([f"experiment={o}"] for o in _options("experiment")),
        ["logger=wandb", "eval=offline"],
    ],
    ids=" ".join,
)
def test_every_option_of_conf_reads_into_the_settings(selection):
    files = ["data.data_files.train=t.jsonl", "data.data_files.validation=v.jsonl"] if "data=local" in selection else []
    cfg = compose([*selection, *files])
    settings = Settings.from_config(cfg)
    assert settings.optim.lr == cfg.optim.lr and settings.data.seq_len == cfg.data.seq_len
    assert settings.train.max_steps == cfg.train.max_steps and settings.trainer.devices == cfg.trainer.devices
    assert (settings.trainer.reshard_after_forward is not None) == (cfg.trainer.strategy == "fsdp2")


@pytest.mark.parametrize("cls", [OptimConfig, TrainConfig, DataConfig, TrainerConfig, EvalSettings])
def test_the_settings_repeat_no_default_of_the_yaml(cls):
    """Every value comes from conf/: a field with a default would be a second place where it is set."""
    defaults = [f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING]
    assert defaults == (["reshard_after_forward"] if cls is TrainerConfig else [])  # only trainer=fsdp has it


def test_a_missing_key_is_named():
    cfg = compose([])
    with open_dict(cfg):
        del cfg.optim["eps"]
    with pytest.raises(ConfigError, match=r"^optim.eps is missing: add it to the optim group's YAML"):
        Settings.from_config(cfg)


def test_a_token_budget_replaces_steps_and_accumulation():
    from egmla.train.budget import apply_budget

    cfg = compose(["experiment=table1_120m", "trainer.devices=8"])
    settings = Settings.from_config(cfg)
    budgeted = settings.with_budget(apply_budget(cfg))
    assert (budgeted.train.max_steps, budgeted.trainer.accumulate_grad_batches) == (95_367, 2)
    assert (settings.train.max_steps, settings.trainer.accumulate_grad_batches) == (200, 1)  # as composed


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_a_resume_with_other_data_workers_is_refused_before_anything_is_written(corpus, tmp_path, capsys):
    """The data position is kept per DataLoader worker: another data.num_workers cannot continue it. Refused in
    one line before config.yaml, environment.json or a checkpoint is touched (it used to fail inside fit)."""
    run_dir = tmp_path / "run"
    base = overrides(corpus, run_dir, "train.max_steps=2", "train.ckpt_every=2", "train.val_every=2")
    run_training(base)
    before = {p.name: _digest(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}
    message = _error(capsys, [*base, "resume=last", "train.max_steps=4", "data.num_workers=2"])
    assert "cannot resume the data stream with num_workers=2: it was saved with num_workers=1" in message
    assert "set data.num_workers=1" in message
    assert {p.name: _digest(p) for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_eval_keys_left_out_take_the_eval_groups_yaml_defaults():
    """A Python caller may pass only the tasks: every other key is conf/eval/none.yaml's."""
    none = OmegaConf.to_container(OmegaConf.load(config_dir() / "eval" / "none.yaml"))
    settings = EvalSettings.from_dict({"tasks": ["piqa_offline"]})
    assert settings.tasks == ("piqa_offline",)
    assert {k: getattr(settings, k) for k in none if k not in ("tasks", "average")} == {
        k: v for k, v in none.items() if k not in ("tasks", "average")
    }
