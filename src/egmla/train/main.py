"""`egmla-train OVERRIDES...` (a Hydra app: -m, --cfg, --help; `python -m egmla.train`: overrides only): train one
model selection, write results.json.

Everything that can be wrong with a selection (config values, data paths, the tokenizer, the checkpoint to
resume) is checked before the run directory is touched; errors are one line on stderr, exit status 2.

    prepare(cfg) -> Run      build the run: typed settings (egmla.train.settings), the machine, the token budget,
                             the checkpoint to resume, the data; writes nothing
    train(run)               write config.yaml, build the module and the trainer, fit, write results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from .. import accounting
from ..config import compose
from ..eval.callback import PeriodicEval
from ..eval.run import evaluate_model
from ..kernels import triton_available
from ..lock import FolderLocked, hold
from ..model import ConfigError
from .budget import Budget, apply_budget
from .checkpoint import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    check_checkpoint,
    check_world_size,
    checkpoint_dir,
    resolve_resume,
    saved_checkpoints,
)
from .datamodule import StreamDataModule
from .fsdp import fsdp2_strategy
from .module import LanguageModel, NonFiniteLossError
from .perf import Throughput
from .profile import StepProfiler
from .progress import progress_callback
from .quiet import quiet_lightning
from .rundir import environment, is_rank_zero, write_json
from .settings import Settings, TrainerConfig

# ------------------------------------------------------------------------------------------------ build the run


@dataclass(frozen=True)
class Run:
    """A selection checked against this machine, its data and the checkpoint it resumes: ready to train."""

    cfg: DictConfig  # the composed config, token budget applied: config.yaml and results.json hold it
    settings: Settings
    run_dir: Path
    resume: Path | None  # the checkpoint to continue from (None: a new run)
    datamodule: StreamDataModule
    budget: Budget
    summary: dict[str, Any]  # parameters, KV bytes and FLOPs per token (egmla.accounting.summary)
    periodic: PeriodicEval | None  # eval.every_steps's callback, its task names checked


def prepare(cfg: DictConfig) -> Run:
    """Check the whole selection and build what training needs. Writes nothing."""
    settings = Settings.from_config(cfg)  # every value, before anything is derived from one
    _check_machine(settings)
    budget = apply_budget(cfg)  # train.max_steps and trainer.accumulate_grad_batches from a token budget
    settings = settings.with_budget(budget)
    profile = settings.train.profile_steps
    if profile is not None and profile[0] >= settings.train.max_steps:
        raise ConfigError(
            f"train.profile_steps={list(profile)} starts after the run's last step ({settings.train.max_steps - 1}, "
            "counted from 0 as metrics.csv's step column): profile steps it trains"
        )
    run_dir = Path(cfg.run_dir)
    resume = resolve_resume(cfg.resume, run_dir)
    saved = check_checkpoint(resume, settings.model) if resume is not None else {}
    if resume is not None:
        check_world_size(saved, resume, budget.world_size)
    datamodule = StreamDataModule(settings.data, seed=settings.seed)
    datamodule.check(settings.model.vocab_size)
    datamodule.check_resume((saved.get("StreamDataModule") or {}).get("ranks") or [])
    evaluation = settings.eval
    periodic = PeriodicEval(asdict(evaluation)) if evaluation.tasks and evaluation.every_steps else None
    summary = accounting.summary(settings.model, "bf16", settings.data.seq_len)
    return Run(cfg, settings, run_dir, resume, datamodule, budget, summary, periodic)


def _check_machine(settings: Settings) -> None:
    """What the selection needs of this machine, in one line before anything is written: a GPU for a GPU trainer,
    CUDA and triton for EG-MLA's fused expansion, the wandb package for logger=wandb."""
    accelerator = settings.trainer.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no visible CUDA GPU: use trainer=cpu here "
            "(trainer=gpu, ddp and fsdp need GPUs)"
        )
    model = settings.model
    if model.keeps_ids and model.attention.fused_expand:  # the Triton kernel of EG-MLA gating the content
        if accelerator == "cpu" or not torch.cuda.is_available():
            raise ConfigError("attention.fused_expand=true runs on CUDA GPUs: use trainer=gpu or set it to false")
        if not triton_available():
            raise ConfigError("attention.fused_expand=true needs triton: pip install triton, or set it to false")
    if settings.logger == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs the wandb package: pip install wandb (or use logger=csv)")


# ------------------------------------------------------------------------------------------------ train


def train(run: Run, callbacks: list | None = None) -> dict[str, Any] | None:
    """Fit, validate at the end, and write results.json (rank zero). Returns the results on rank zero.

    Rank zero holds the run directory's lock throughout (FolderLocked if another trainer or egmla-eval holds it);
    the other ranks, started by the launcher, write nothing there and take no lock.
    `callbacks`: extra Lightning callbacks (tests use them to watch batches or to simulate a crash)."""
    with hold(run.run_dir, "run dir") if is_rank_zero() else nullcontext():
        return _train(run, callbacks)


def _train(run: Run, callbacks: list | None) -> dict[str, Any] | None:
    quiet_lightning()
    if is_rank_zero():
        write_run_files(run)
    L.seed_everything(run.settings.seed, workers=True, verbose=False)
    if run.settings.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    module = build_module(run)
    trainer, checkpoints, throughput = build_trainer(run, callbacks or [])
    fit(run, trainer, module, checkpoints)
    if not trainer.is_global_zero:
        return None
    return write_results(run, trainer, module, throughput)


def write_run_files(run: Run) -> None:
    """config.yaml (the config as resolved for this run) and environment.json (versions, git, command line)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg, resolve=True))
    write_json(run.run_dir / "environment.json", environment(sys.argv))


def build_module(run: Run) -> LanguageModel:
    s, t = run.settings, run.settings.train
    return LanguageModel(
        s.model,
        s.optim,
        t.max_steps,
        torch.as_tensor(run.datamodule.tokenizer.token_bytes()),
        compile=t.compile_scope if t.compile else None,
        activation_checkpointing=t.activation_checkpointing,
        sharding=_sharding(s.trainer),
        fused_loss=t.fused_loss,
    )


def build_trainer(run: Run, callbacks: list) -> tuple[L.Trainer, ModelCheckpoint, Throughput]:
    """The Lightning Trainer, with the checkpoint and throughput callbacks whose records the results need."""
    s, t, d = run.settings, run.settings.train, run.settings.data
    accumulate = s.trainer.accumulate_grad_batches
    strategy, precision = _strategy(s.trainer)
    throughput = Throughput(run.summary["flops_per_token"], d.batch_size * d.seq_len, t.log_every)
    checkpoints = ModelCheckpoint(
        dirpath=checkpoint_dir(run.run_dir),
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.ckpt_every,
        save_top_k=t.keep_checkpoints,
        monitor="step",  # the newest checkpoint is the best: best_model_score is the step it holds
        mode="max",
        save_last="link",  # last.ckpt links to the newest checkpoint: one write per save, not two
        enable_version_counter=False,  # a resumed run rewrites stepN.ckpt and last.ckpt, never adds last-v1.ckpt
    )
    optional = [run.periodic] if run.periodic is not None else []
    if t.profile_steps is not None:
        optional.append(StepProfiler(*t.profile_steps, run.run_dir / "profile"))
    trainer = L.Trainer(
        accelerator=s.trainer.accelerator,
        devices=s.trainer.devices,
        num_nodes=s.trainer.num_nodes,
        strategy=strategy,
        precision=precision,
        accumulate_grad_batches=accumulate,
        max_steps=t.max_steps,
        val_check_interval=t.val_every * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every,
        logger=_logger(run.cfg, run.run_dir),
        callbacks=[checkpoints, throughput, progress_callback(t.log_every), *optional, *callbacks],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run.run_dir),
        enable_model_summary=False,
    )
    budgeted = t.max_tokens is not None or t.global_batch_tokens is not None
    if budgeted and trainer.world_size != run.budget.world_size:
        raise ConfigError(
            f"the launcher started {trainer.world_size} ranks, the token budget was derived for "
            f"{run.budget.world_size} (trainer.devices x trainer.num_nodes): set them to match the launch"
        )
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {
                    "kv/bytes_per_token": run.summary["kv"]["bytes_per_token"],
                    **{f"params/{k}": v for k, v in run.summary["params"].items()},
                }
            )
    return trainer, checkpoints, throughput


def _strategy(t: TrainerConfig) -> tuple[Any, str]:
    """(Lightning strategy, Lightning precision) for the trainer config group.

    Under FSDP2, bf16-mixed is FSDP's own mixed precision (bf16 parameters for compute, fp32 gradient
    reduction and fp32 master weights), so Lightning itself runs in full precision without autocast.
    """
    if t.strategy != "fsdp2":
        return t.strategy, t.precision
    return fsdp2_strategy(), "32-true" if t.precision == "bf16-mixed" else t.precision


def _sharding(t: TrainerConfig) -> dict[str, Any] | None:
    """FSDP2's settings for the module (egmla.train.fsdp.prepare_model's keywords); None without FSDP2."""
    if t.strategy != "fsdp2":
        return None
    return {"precision": t.precision, "reshard_after_forward": t.reshard_after_forward}


def _logger(cfg: DictConfig, run_dir: Path) -> Logger:
    if cfg.logger.name == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv")  # csv/version_N/metrics.csv: a resume adds N+1
    mode = cfg.logger.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") or _has_netrc_key() else "offline"
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or cfg.experiment_name or cfg.run_name,
        name=cfg.run_name,
        save_dir=str(run_dir),
        mode=mode,
        tags=list(cfg.logger.tags),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _has_netrc_key() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def fit(run: Run, trainer: L.Trainer, module: LanguageModel, checkpoints: ModelCheckpoint) -> None:
    """Train; checkpoint the final step where no periodic checkpoint holds it; validate the final weights."""
    trainer.fit(module, datamodule=run.datamodule, ckpt_path=run.resume, weights_only=True)
    newest = checkpoints.best_model_score  # monitor="step": the step of the newest checkpoint (None: none yet)
    if (newest is None or int(newest) != trainer.global_step) and not trainer.interrupted:
        # weights_only=False: the whole training state, so the run can resume (Lightning logs a note when unset)
        trainer.save_checkpoint(checkpoint_dir(run.run_dir) / "last.ckpt", weights_only=False)
    if module.last_val_step != trainer.global_step:  # the end is not on a validation step: validate once more
        trainer.validate(module, datamodule=run.datamodule, verbose=False)


# ------------------------------------------------------------------------------------------------ write results


def _profiled_steps(trainer: L.Trainer) -> list[int] | None:
    return next((c.recorded for c in trainer.callbacks if isinstance(c, StepProfiler)), None)


def write_results(run: Run, trainer: L.Trainer, module: LanguageModel, throughput: Throughput) -> dict[str, Any]:
    """results.json: the config, the environment, the model's size, what was trained and how fast, the final
    validation, and (with eval.tasks) the final checkpoint's accuracies."""
    s, cfg = run.settings, run.cfg
    accumulate = s.trainer.accumulate_grad_batches
    tokens_per_step = s.data.batch_size * s.data.seq_len * trainer.world_size * accumulate
    results = {
        "run_name": cfg.run_name,
        "experiment_name": cfg.experiment_name,
        "run_dir": str(run.run_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **environment(sys.argv, short=True),
        "data": run.datamodule.record(),
        "params": run.summary["params"],
        "kv": run.summary["kv"],
        "flops_per_token": run.summary["flops_per_token"],
        "train": {
            "steps": trainer.global_step,
            "tokens": trainer.global_step * tokens_per_step,
            "tok_per_s": throughput.steady_tok_per_s,  # after the first log window (compilation, warm-up)
            "mfu": throughput.steady_mfu,
            # shares of that time between batches and in Python's garbage collector (egmla/train/perf.py)
            "between_batches": throughput.steady_share(throughput.between_batches),
            "garbage_collection": throughput.steady_share(throughput.garbage_collection),
            "checkpoint_s": throughput.checkpoint_seconds,  # checkpoint writes, left out of tok_per_s
            "profiled_steps": _profiled_steps(trainer),  # slowed by the profiler (and counted in tok_per_s)
            "devices": trainer.world_size,
            "max_tokens": run.budget.max_tokens,  # the budget asked for (null: given in steps)
            "global_batch_tokens": tokens_per_step,
            "accumulation": accumulate,
            "resumed_from": str(run.resume) if run.resume else None,
        },
        "val": module.last_val,
    }
    if run.periodic is not None:
        results["eval_history"] = run.periodic.history
    if s.eval.tasks:
        results |= final_evaluation(run, trainer, module)
    results["earlier_evals"] = earlier_evals(run.run_dir / "results.json")
    write_json(run.run_dir / "results.json", results)
    return results


def final_evaluation(run: Run, trainer: L.Trainer, module: LanguageModel) -> dict[str, Any]:
    """The final checkpoint's accuracies, as egmla-eval gives them, and the eval settings they were scored with."""
    settings = asdict(run.settings.eval)
    if settings["device"] == "auto":  # after fit Lightning has moved the module back to the CPU: use its device
        settings["device"] = str(trainer.strategy.root_device)
    manager = run.periodic.manager if run.periodic is not None else None
    scores = evaluate_model(module.model, run.datamodule.tokenizer, settings, manager)
    return {**scores, "eval_config": asdict(run.settings.eval)}


EVAL_KEYS = ("eval", "avg_acc", "avg_acc_norm", "eval_splits", "eval_config", "eval_history")


def earlier_evals(path: Path) -> list[dict[str, Any]]:
    """The evaluations a results.json already holds (a run resumed and trained further rewrites the file): its own
    earlier_evals, then its evaluation of the checkpoint it was written for, with that checkpoint's step. They
    stay in the file under earlier_evals, never as the new checkpoint's accuracies."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    kept = list(old.get("earlier_evals") or [])
    if any(key in old for key in EVAL_KEYS):
        kept.append({"steps": (old.get("train") or {}).get("steps"), **{k: old[k] for k in EVAL_KEYS if k in old}})
    return kept


def main(argv: list[str] | None = None) -> int:
    """`python -m egmla.train OVERRIDES...`: one run, overrides only (what egmla-sweep, srun and the tests call)."""
    parser = argparse.ArgumentParser(
        prog="egmla-train",
        description="Train one model selection. Arguments are Hydra overrides of conf/train.yaml.",
        epilog="example: egmla-train experiment=demo_tiny attention=egmla attention.gate_dim=64",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=120m attention=mla trainer=gpu")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    return run(args.overrides, print_config=args.print_config)


def _resume_advice(run_dir: Path) -> str:
    """Where to resume after a non-finite loss: the newest checkpoint, by its exact path. Every checkpoint was
    checked finite and not blown up when it was saved."""
    saved = saved_checkpoints(run_dir)
    if not saved:
        return "rerun without resume (no checkpoint was written)"
    return f"resume={saved[-1]} (the last checkpoint, its weights checked finite)"


def run(overrides: list[str], print_config: bool = False) -> int:
    """Compose, check, train one selection; the exit status: 0 done, 1 stopped (a non-finite loss, a checkpoint
    that could not be written), 2 a bad setting."""
    try:
        cfg = compose(overrides)
        if print_config:
            description = apply_budget(cfg, launch=False).describe()  # fills in the derived steps and accumulation
            print("\n".join([*description, OmegaConf.to_yaml(cfg, resolve=True)]))
            return 0
        prepared = prepare(cfg)
    except ConfigError as exc:
        print(f"egmla-train: error: {exc}", file=sys.stderr)
        return 2
    try:
        results = train(prepared)
    except NonFiniteLossError as exc:
        advice = _resume_advice(prepared.run_dir)
        print(f"egmla-train: error: {exc}: lower optim.lr or raise optim.warmup_steps, then {advice}", file=sys.stderr)
        return 1
    except CheckpointWriteError as exc:
        print(f"egmla-train: error: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, FolderLocked) as exc:  # the ranks a launcher started, a data position, a run dir in use
        print(f"egmla-train: error: {exc}", file=sys.stderr)
        return 2
    if results is not None:
        val = results["val"] or {}
        print(
            f"{cfg.run_name}: {results['train']['steps']} steps, {results['train']['tokens']:,} tokens, "
            f"val/loss {val.get('loss', float('nan')):.4f}, val/bpb {val.get('bpb', float('nan')):.4f}, "
            f"KV {results['kv']['bytes_per_token']:,} B/token -> {prepared.run_dir / 'results.json'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
