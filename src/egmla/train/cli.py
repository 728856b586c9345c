"""`egmla-train`, a Hydra application: -m sweeps, --cfg, --info, --help with the config groups, hydra/launcher=....
Each job's overrides go through egmla.train.main.run (compose, prepare, train), so its config and run name are
compose()'s. Kept apart from main.py so that --help, --cfg and a multirun's launcher start without importing torch
and Lightning (each job imports them in its own process)."""

from __future__ import annotations

import subprocess
import sys

import hydra
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from ..config import compose, config_dir
from ..model import ConfigError

_statuses: list[int] = []  # the exit status of each job this process ran


def cli() -> None:
    """The `egmla-train` console script. Exit status: the worst job's (0, 1 stopped, 2 a bad setting)."""
    args = sys.argv[1:]
    if "--print-config" in args:  # the config as the run uses it: run-name tags, budget-derived steps
        from .main import main

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
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        print(f"egmla-train: job {hydra_cfg.job.num}: {' '.join(overrides)}", flush=True)
        status = subprocess.run([sys.executable, "-m", "egmla.train", *overrides]).returncode
    else:
        from .main import run  # torch and Lightning: only a job that trains in this process needs them

        status = run(overrides)
    _statuses.append(status)  # in a multirun a failed job is reported (its own error line) and the next one runs
    if status and not hydra_cfg.launcher._target_.endswith("BasicLauncher"):
        # a launcher's job runs in a process of its own (submitit, SLURM): _statuses never reaches this command's
        # exit status, so the job fails, Hydra re-raises it here, and egmla-train exits non-zero
        raise JobFailed(f"job {hydra_cfg.job.num} ({' '.join(overrides)}) exited with status {status}")
    return status


class JobFailed(RuntimeError):
    """A multirun job run by another launcher than Hydra's basic one ended with a non-zero status."""
