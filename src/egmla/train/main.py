"""`egmla-train OVERRIDES...` (a Hydra app: -m, --cfg, --help; `python -m egmla.train`: overrides only): train one
model selection, write results.json.

Everything that can be wrong with a selection (config values, data paths, the tokenizer, the checkpoint to
resume) is checked before the run directory is touched; errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .. import accounting
from ..config import compose, config_dir, model_config
from ..lock import FolderLocked, hold
from ..model import ConfigError
from ..model.config import check_choice, check_positive_int
from .budget import apply_budget
from .rundir import environment, is_rank_zero, write_json

STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp2")


def _check_settings(cfg: DictConfig) -> None:
    from .fsdp import AC_MODES, COMPILE_SCOPES
    from .schedule import SCHEDULES

    o, t = cfg.optim, cfg.train
    check_choice("optim.schedule", o.schedule, SCHEDULES)
    if not o.lr > 0:
        raise ConfigError(f"optim.lr={o.lr} is invalid: expected a positive learning rate")
    for key in ("max_steps", "val_every", "log_every", "ckpt_every", "val_batches"):
        check_positive_int(f"train.{key}", t[key])
    check_choice("trainer.strategy", cfg.trainer.strategy, STRATEGIES)
    check_choice("train.compile_scope", t.get("compile_scope", "model"), COMPILE_SCOPES)
    check_choice("train.activation_checkpointing", t.get("activation_checkpointing", "none"), AC_MODES)
    if not isinstance(t.get("fused_loss", True), bool):
        raise ConfigError(f"train.fused_loss={t.fused_loss!r} is invalid: expected true or false")
    if cfg.trainer.strategy == "fsdp2" and cfg.get("eval", {}).get("tasks"):
        raise ConfigError(
            "eval with trainer=fsdp is not supported (a sharded model needs every rank): train with eval=none, "
            "then run egmla-eval checkpoint=RUN_DIR on the sharded checkpoint"
        )


def _strategy(cfg: DictConfig) -> tuple[Any, str, dict | None]:
    """(Lightning strategy, Lightning precision, FSDP2 settings or None) for the trainer config group.

    Under FSDP2, bf16-mixed is FSDP's own mixed precision (bf16 parameters for compute, fp32 gradient
    reduction and fp32 master weights), so Lightning itself runs in full precision without autocast.
    """
    t = cfg.trainer
    if t.strategy != "fsdp2":
        return t.strategy, t.precision, None
    from .fsdp import fsdp2_strategy

    sharding = {"precision": t.precision, "reshard_after_forward": t.get("reshard_after_forward", True)}
    return fsdp2_strategy(), "32-true" if t.precision == "bf16-mixed" else t.precision, sharding


def _logger(cfg: DictConfig, run_dir: Path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if cfg.logger.name == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv")  # csv/version_N/metrics.csv: a resume adds N+1
    if cfg.logger.name != "wandb":
        raise ConfigError(f"logger.name={cfg.logger.name!r} is invalid: expected csv or wandb")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("logger=wandb needs the wandb package: pip install wandb (or use logger=csv)") from None
    mode = cfg.logger.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") or _has_netrc_key() else "offline"
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or cfg.get("experiment_name") or cfg.run_name,
        name=cfg.run_name,
        save_dir=str(run_dir),
        mode=mode,
        tags=list(cfg.logger.tags),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _has_netrc_key() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _check_accelerator(cfg: DictConfig) -> None:
    """A GPU trainer on a machine without a visible CUDA GPU: one line before anything is written."""
    import torch

    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no visible CUDA GPU: use trainer=cpu here "
            "(trainer=gpu, ddp and fsdp need GPUs)"
        )


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Validate the whole selection; return what training needs. Writes nothing."""
    from .checkpoint import check_checkpoint, check_world_size, resolve_resume
    from .datamodule import StreamDataModule

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:
        raise ConfigError(f"config is incomplete: {str(exc).splitlines()[0]}") from None
    mcfg = model_config(cfg)
    _check_accelerator(cfg)
    budget = apply_budget(cfg)  # train.max_steps and trainer.accumulate_grad_batches from a token budget
    _check_settings(cfg)
    if mcfg.keeps_ids and mcfg.attention.fused_expand:  # the Triton kernel of EG-MLA gating the content
        import torch

        from ..kernels import triton_available

        if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available():
            raise ConfigError("attention.fused_expand=true runs on CUDA GPUs: use trainer=gpu or set it to false")
        if not triton_available():
            raise ConfigError("attention.fused_expand=true needs triton: pip install triton, or set it to false")
    if str(cfg.trainer.precision).startswith("16"):
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} is not supported (fp16 needs loss scaling): use bf16-mixed"
        )
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}: "
            "lower one or raise the other"
        )
    run_dir = Path(cfg.run_dir)
    resume = resolve_resume(cfg.resume, run_dir)
    if resume is not None:
        check_world_size(check_checkpoint(resume, mcfg), resume, budget.world_size)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule = StreamDataModule(data_cfg, seed=cfg.seed)
    datamodule.check(mcfg.vocab_size)
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True) if "eval" in cfg else {"tasks": []}
    periodic = None  # bad eval settings fail now, not after training
    if eval_cfg.get("tasks") and eval_cfg.get("every_steps"):
        from ..eval.callback import PeriodicEval

        periodic = PeriodicEval(eval_cfg)  # checks the settings and the task names
    elif eval_cfg.get("tasks"):
        from ..eval.run import EvalSettings

        EvalSettings.from_dict(eval_cfg).require_tasks()
    return {"model_cfg": mcfg, "run_dir": run_dir, "resume": resume, "datamodule": datamodule,
            "eval_cfg": eval_cfg, "periodic": periodic, "budget": budget}  # fmt: skip


def train(cfg: DictConfig, prepared: dict[str, Any], callbacks: list | None = None) -> dict[str, Any] | None:
    """Fit, validate at the end, and write results.json (rank zero). Returns the results on rank zero.

    Rank zero holds the run directory's lock throughout (FolderLocked if another trainer or egmla-eval holds it);
    the other ranks, started by the launcher, write nothing there and take no lock.
    `callbacks`: extra Lightning callbacks (tests use them to watch batches or to simulate a crash)."""
    with hold(prepared["run_dir"], "run dir") if is_rank_zero() else nullcontext():
        return _train(cfg, prepared, callbacks)


def _train(cfg: DictConfig, prepared: dict[str, Any], callbacks: list | None) -> dict[str, Any] | None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .checkpoint import AtomicCheckpointIO, checkpoint_dir
    from .module import LanguageModel
    from .perf import Throughput
    from .progress import progress_callback
    from .quiet import quiet_lightning

    quiet_lightning()
    mcfg, run_dir, datamodule = prepared["model_cfg"], prepared["run_dir"], prepared["datamodule"]
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_json(run_dir / "environment.json", environment(sys.argv))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    t, d = cfg.train, cfg.data
    accumulate = cfg.trainer.accumulate_grad_batches
    token_bytes = torch.as_tensor(datamodule.tokenizer.token_bytes())
    strategy, precision, sharding = _strategy(cfg)
    ac = t.get("activation_checkpointing", "none")
    compile = t.get("compile_scope", "model") if t.compile else None
    module = LanguageModel(mcfg, OmegaConf.to_container(cfg.optim), t.max_steps, token_bytes, compile=compile,
                           activation_checkpointing=ac, sharding=sharding,
                           fused_loss=t.get("fused_loss", True))  # fmt: skip
    summary = accounting.summary(mcfg, "bf16", d.seq_len)
    throughput = Throughput(summary["flops_per_token"], d.batch_size * d.seq_len, t.log_every)
    extra_callbacks = [prepared["periodic"]] if prepared["periodic"] is not None else []
    checkpoints = ModelCheckpoint(
        dirpath=checkpoint_dir(run_dir),
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.ckpt_every,
        save_top_k=t.keep_checkpoints,
        monitor="step",
        mode="max",
        save_last="link",  # last.ckpt links to the newest checkpoint: one write per save, not two
        enable_version_counter=False,  # a resumed run rewrites stepN.ckpt and last.ckpt, never adds last-v1.ckpt
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=strategy,
        precision=precision,
        accumulate_grad_batches=accumulate,
        max_steps=t.max_steps,
        val_check_interval=t.val_every * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every,
        logger=_logger(cfg, run_dir),
        callbacks=[checkpoints, throughput, progress_callback(t.log_every), *extra_callbacks, *(callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    budget_keys = t.get("max_tokens") is not None or t.get("global_batch_tokens") is not None
    if budget_keys and trainer.world_size != prepared["budget"].world_size:
        raise ConfigError(
            f"the launcher started {trainer.world_size} ranks, the token budget was derived for "
            f"{prepared['budget'].world_size} (trainer.devices x trainer.num_nodes): set them to match the launch"
        )
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_hyperparams({"kv/bytes_per_token": summary["kv"]["bytes_per_token"],
                                    **{f"params/{k}": v for k, v in summary["params"].items()}})  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=prepared["resume"], weights_only=True)
    last = checkpoint_dir(run_dir) / "last.ckpt"
    if checkpoints._last_global_step_saved != trainer.global_step and not trainer.interrupted:
        trainer.save_checkpoint(last)  # the final step, when it is not a multiple of train.ckpt_every
    if module.last_val_step != trainer.global_step:  # the end is not on a validation step: validate once more
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return None
    tokens_per_step = d.batch_size * d.seq_len * trainer.world_size * accumulate
    results = {
        "run_name": cfg.run_name,
        "experiment_name": cfg.get("experiment_name"),
        "run_dir": str(run_dir),
        "config": resolved,
        **environment(sys.argv, short=True),
        "data": datamodule.record(),
        "params": summary["params"],
        "kv": summary["kv"],
        "flops_per_token": summary["flops_per_token"],
        "train": {
            "steps": trainer.global_step,
            "tokens": trainer.global_step * tokens_per_step,
            "tok_per_s": throughput.steady_tok_per_s,  # after the first log window (compilation, warm-up)
            "mfu": throughput.steady_mfu,
            "checkpoint_s": throughput.checkpoint_seconds,  # checkpoint writes, left out of tok_per_s
            "devices": trainer.world_size,
            "max_tokens": prepared["budget"].max_tokens,  # the budget asked for (null: given in steps)
            "global_batch_tokens": tokens_per_step,
            "accumulation": accumulate,
            "resumed_from": str(prepared["resume"]) if prepared["resume"] else None,
        },
        "val": module.last_val,
    }
    if prepared["periodic"] is not None:
        results["eval_history"] = prepared["periodic"].history
    eval_cfg = prepared["eval_cfg"]
    if eval_cfg.get("tasks"):  # the final checkpoint's accuracies, as egmla-eval gives them
        from ..eval.run import evaluate_model

        # After fit Lightning has moved the module back to the CPU: evaluate on the device it trained on.
        device = str(trainer.strategy.root_device) if eval_cfg.get("device", "auto") == "auto" else eval_cfg["device"]
        manager = prepared["periodic"].manager if prepared["periodic"] is not None else None
        results |= evaluate_model(module.model, datamodule.tokenizer, eval_cfg | {"device": device}, manager)
        results["eval_config"] = eval_cfg
    results["earlier_evals"] = earlier_evals(run_dir / "results.json")
    write_json(run_dir / "results.json", results)
    return results


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
    from .checkpoint import existing_checkpoints

    saved = [p for p in existing_checkpoints(run_dir) if p.name.startswith("step")]
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
    from .checkpoint import CheckpointWriteError
    from .module import NonFiniteLossError

    try:
        results = train(cfg, prepared)
    except NonFiniteLossError as exc:
        print(f"egmla-train: error: {exc}: lower optim.lr or raise optim.warmup_steps, then "
              f"{_resume_advice(prepared['run_dir'])}", file=sys.stderr)  # fmt: skip
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
            f"KV {results['kv']['bytes_per_token']:,} B/token -> {prepared['run_dir'] / 'results.json'}"
        )
    return 0


# ------------------------------------------------------------------------------------------------ Hydra app
# `egmla-train` is a Hydra application: -m sweeps, --cfg, --info, --help with the config groups, hydra/launcher=...
# Each job's overrides go through run() (compose, prepare, train), so its config and run name are compose()'s.

_statuses: list[int] = []  # the exit status of each job this process ran


def cli() -> None:
    """The `egmla-train` console script. Exit status: the worst job's (0, 1 stopped, 2 a bad setting)."""
    import hydra

    args = sys.argv[1:]
    if "--print-config" in args:  # the config as the run uses it: run-name tags, budget-derived steps
        sys.exit(main(args))
    try:
        conf = config_dir()
        for overrides in _jobs(args):  # every job composes before the first one starts
            compose(overrides)
    except ConfigError as exc:
        message = str(exc).replace("add --multirun to your command line", "add -m (--multirun) to egmla-train")
        print(f"egmla-train: error: {message}", file=sys.stderr)
        sys.exit(2)
    hydra.main(config_path=str(conf), config_name="train", version_base="1.3")(_hydra_job)()
    sys.exit(max(_statuses, default=0))


def _jobs(args: list[str]) -> list[list[str]]:
    """The overrides of each job the command line asks for (none for --help, --hydra-help, shell completion)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parsed, _ = get_args_parser().parse_known_args(args)
    if parsed.help or parsed.hydra_help or parsed.shell_completion:
        return []
    if sum(map(bool, (parsed.run, parsed.multirun, parsed.cfg, parsed.info))) > 1:
        raise ConfigError("give only one of -m (--multirun), --run, --cfg and --info")
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot parse overrides {parsed.overrides}: {str(exc).splitlines()[0]}") from None
    hydra_overrides = [o.input_line for o in overrides if o.is_hydra_override()]
    task = [o for o in overrides if not o.is_hydra_override()]
    if not parsed.multirun:
        return [[*hydra_overrides, *(o.input_line for o in task)]]
    return [[*hydra_overrides, *job] for job in BasicSweeper.split_arguments(task, None)[0]]


def _hydra_job(_: DictConfig) -> int:
    """One job: in this process for a single run; under -m in a process of its own (`python -m egmla.train`), so
    that each DDP job starts its ranks afresh and a crash or a stuck GPU does not reach the next job."""
    import subprocess

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        print(f"egmla-train: job {hydra_cfg.job.num}: {' '.join(overrides)}", flush=True)
        status = subprocess.run([sys.executable, "-m", "egmla.train", *overrides]).returncode
    else:
        status = run(overrides)
    _statuses.append(status)  # in a multirun a failed job is reported (its own error line) and the next one runs
    return status


if __name__ == "__main__":
    sys.exit(main())
