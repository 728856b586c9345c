"""`egmla-eval checkpoint=RUN_DIR [eval=offline|paper] [eval.limit=20] ...`: score a trained run with lm-eval.

    evaluate_model(model, tokenizer, eval_cfg)  -> {"eval": {task: {metric: value}}, "avg_acc": float | None,
                                                    "avg_acc_norm": float | None, "eval_splits": {task: split}}
    evaluate_run(run_dir, eval_cfg)             the same, merged into RUN_DIR/results.json

`eval_cfg` is a conf/eval/ group as a dict (offline.yaml documents every key). Every metric lm-eval reports for a
requested task is kept (acc and acc_norm, their stderr, perplexity...). Two averages over the `average` tasks:
`avg_acc` of acc, `avg_acc_norm` of acc_norm where the task reports it (lm-eval's piqa, arc_*, hellaswag) and acc
elsewhere; None (never 0) when any task is missing. `metric` (acc | acc_norm) names the headline one, shown
first. `eval_splits` is the split each task was scored on (a group: its tasks' split). Values are lm-eval's
fractions (0.4384); the printed table shows accuracies in percent.

The command line takes Hydra overrides of conf/train.yaml (only its `eval` group and `data_dir` matter here)
plus `checkpoint=RUN_DIR`; errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..lock import FolderLocked, hold
from ..model import ConfigError
from ..model.config import check_int as check_config_int
from ..model.config import error_summary
from .offline_tasks import declarations

PROG = "egmla-eval"
USAGE = f"usage: {PROG} checkpoint=RUN_DIR [eval=offline|paper] [eval.limit=N] [eval.KEY=VALUE ...]"
DEVICES = ("auto", "cpu", "cuda", "mps")
AVERAGES = {"acc": "avg_acc", "acc_norm": "avg_acc_norm"}  # eval.metric -> its average's key in results.json


class EvalError(ConfigError):
    """An evaluation that cannot run (missing task data, unknown task): one line naming the fix. A ConfigError,
    so egmla-train's start-up checks report it like any other bad setting."""


# ---------------------------------------------------------------------------------------------------------------
# Settings


@functools.cache
def _yaml_defaults() -> dict[str, Any]:
    """conf/eval/none.yaml, the eval group's defaults (no suite)."""
    from omegaconf import OmegaConf

    from ..config import config_dir

    return OmegaConf.to_container(OmegaConf.load(config_dir() / "eval" / "none.yaml"), resolve=True)


@dataclass(frozen=True)
class EvalSettings:
    """A conf/eval/ group, checked. See conf/eval/offline.yaml for the meaning of each key.

    `metrics` may name tasks that `tasks` leaves out (a narrowed suite keeps the group's mapping)."""

    name: str
    tasks: tuple[str, ...]
    average: tuple[str, ...]
    metric: str
    metrics: dict[str, str]
    limit: int | float | None
    num_fewshot: int
    batch_size: int
    include_path: str | None
    include_defaults: bool
    bootstrap_iters: int
    every_steps: int | None
    device: str

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> EvalSettings:
        """`cfg` over conf/eval/none.yaml: a key it leaves out takes that file's value (the YAML holds every
        default; a Python caller may pass only the tasks)."""
        cfg = _plain(cfg)
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(cfg) - known):
            raise ConfigError(f"eval.{unknown[0]} is not an eval setting: expected one of {', '.join(sorted(known))}")
        values = {**_yaml_defaults(), **cfg}
        for key in ("tasks", "average"):
            values[key] = tuple(_str_list(values.get(key) or [], key))
        values["metrics"] = dict(values.get("metrics") or {})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if missing := [t for t in self.average if t not in self.tasks]:
            if unknown := first_unknown_task(self):  # a misspelt eval.tasks entry: name it, not eval.average
                raise unknown
            raise ConfigError(
                f"eval.average names {missing[0]!r}, which is not in eval.tasks: add it to eval.tasks or set "
                "eval.average=[...] to the tasks averaged into avg_acc"
            )
        if self.metric not in AVERAGES:
            raise ConfigError(f"eval.metric={self.metric!r} is invalid: expected acc or acc_norm (the headline)")
        for task, metric in self.metrics.items():
            if metric in AVERAGES:  # the former per-task choice of the averaged accuracy
                raise ConfigError(
                    f"eval.metrics.{task}={metric} is no longer a setting: results.json now holds avg_acc (acc) and "
                    "avg_acc_norm (acc_norm where the task defines it); choose the headline with eval.metric=acc|"
                    f"acc_norm and drop eval.metrics.{task} (it names only non-accuracy columns, e.g. word_perplexity)"
                )
        _check_limit(self.limit)
        check_int("num_fewshot", self.num_fewshot, minimum=0)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("bootstrap_iters", self.bootstrap_iters, minimum=0)
        if self.every_steps is not None:
            check_int("every_steps", self.every_steps, minimum=1)
        if str(self.device).split(":")[0] not in DEVICES:
            raise ConfigError(f"eval.device={self.device!r} is invalid: expected auto, cpu, cuda, cuda:N or mps")
        if self.tasks and not self.include_defaults and not self.include_path:
            raise ConfigError("eval.include_defaults=false needs eval.include_path (a folder of task YAMLs)")

    def column(self, task: str, scores: dict[str, float | None] | None = None) -> str:
        """The metric shown for `task`: its eval.metrics entry, else the headline accuracy as averaged."""
        return self.metrics.get(task) or task_accuracy_metric(scores or {}, self.metric)

    def require_tasks(self) -> None:
        if not self.tasks:
            raise ConfigError(
                f"eval={self.name} selects no tasks: choose eval=offline (after `make eval-data`) or eval=paper "
                "(lm-eval's stock tasks, needs the Hugging Face hub)"
            )


def _plain(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    if not isinstance(cfg, dict):
        raise ConfigError(f"eval config must be a mapping of settings, got {type(cfg).__name__}")
    return dict(cfg)


def _str_list(value: Any, key: str) -> list[str]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"eval.{key}={value!r} is invalid: expected a list of task names")
    return list(value)


def check_int(key: str, value: Any, minimum: int) -> None:
    check_config_int(f"eval.{key}", value, minimum)


def _check_limit(limit: Any) -> None:
    ok = limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0)
    ok = ok or (isinstance(limit, float) and 0 < limit <= 1)
    if not ok:
        raise ConfigError(
            f"eval.limit={limit!r} is invalid: expected null (all examples), a positive number of examples per task, "
            "or a fraction in (0, 1]"
        )


# ---------------------------------------------------------------------------------------------------------------
# Tasks


def _build_hint(settings: EvalSettings, force: bool = False) -> str:
    """How to (re)build the offline data whose task YAMLs `include_path` holds (it is OUT/tasks)."""
    out = Path(settings.include_path).parent if settings.include_path else Path("data/eval")
    flag = " --force" if force else ""
    return f"run `make eval-data` (python -m egmla.eval.eval_data --out {out}{flag})"


def check_include_path(settings: EvalSettings) -> None:
    path = settings.include_path
    if path and not Path(path).is_dir():
        raise EvalError(f"eval.include_path={path} is not a folder of task YAMLs: {_build_hint(settings)}")


def task_manager(settings: EvalSettings):
    """lm-eval's TaskManager over `include_path` (+ its built-in tasks when include_defaults). Portable task YAMLs
    (`make eval-data`'s) are given to lm-eval rendered with this machine's paths (offline_tasks.loadable_tasks)."""
    from lm_eval.tasks import TaskManager

    from .offline_tasks import TaskTemplateError, loadable_tasks

    check_include_path(settings)
    try:
        include = loadable_tasks(settings.include_path) if settings.include_path else None
    except (TaskTemplateError, OSError) as exc:
        raise EvalError(f"cannot read the task YAMLs in {settings.include_path} ({exc})") from None
    manager = TaskManager(include_path=str(include) if include else None, include_defaults=settings.include_defaults)
    manager.egmla_include = include  # the folder lm-eval indexed (a rendered copy), for error messages
    return manager


def _unreadable_task(task: str, manager, settings: EvalSettings) -> EvalError | None:
    """A YAML of include_path declares `task` but lm-eval's index skipped it: the error names lm-eval's reason."""
    from .offline_tasks import declaring_yamls, load_error

    indexed = getattr(manager, "egmla_include", None)
    if not settings.include_path or indexed is None:
        return None
    for path in declaring_yamls(indexed, task):
        if reason := load_error(path):
            source = Path(settings.include_path) / path.relative_to(indexed)
            return EvalError(
                f"task {task!r} is in {source}, but lm-eval cannot read it ({reason}): install the lm-eval version "
                f"pyproject.toml names, or write the task YAMLs again: {_build_hint(settings)}"
            )
    return None


def _unknown_task(task: str, manager, settings: EvalSettings) -> EvalError:
    if unreadable := _unreadable_task(task, manager, settings):
        return unreadable
    if not settings.include_defaults:
        return _not_in_folder(task, settings, declared_tasks(Path(settings.include_path)))
    close = difflib.get_close_matches(task, manager.all_tasks, n=3)
    hint = f" (close: {', '.join(close)})" if close else ""
    return EvalError(f"task {task!r} is not an lm-eval task{hint}: fix eval.tasks")


def _not_in_folder(task: str, settings: EvalSettings, known: list[str]) -> EvalError:
    close = difflib.get_close_matches(task, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return EvalError(
        f"task {task!r} in eval.tasks is not among the task YAMLs in {settings.include_path}{hint}: known tasks "
        f"{', '.join(known) or '(none)'}; fix eval.tasks, or {_build_hint(settings)}"
    )


def declared_tasks(folder: Path, found: list[tuple[str, str, Path]] | None = None) -> list[str]:
    """The task and group names declared by the YAMLs of `folder` (its subfolders: groups only, e.g. mmlu_offline
    and its categories rather than 57 subjects); `found`: the folder's declarations, if already read."""
    found = declarations(folder) if found is None else found
    names = [name for kind, name, path in found if path.parent == folder or kind == "group"]
    return sorted(set(names), key=names.index)


def first_unknown_task(settings: EvalSettings) -> EvalError | None:
    """The error for the first of eval.tasks that is not a task here, or None (also when that cannot be told yet:
    no folder of task YAMLs). Indexes lm-eval's tasks when include_defaults: seconds, so only on an error path."""
    if not settings.include_defaults:
        folder = Path(settings.include_path or "")
        if not settings.include_path or not folder.is_dir():
            return None
        found = declarations(folder)  # every YAML read once
        known, every_name = declared_tasks(folder, found), {name for _, name, _ in found}
        unknown = [t for t in settings.tasks if t not in every_name]
        return _not_in_folder(unknown[0], settings, known) if unknown else None
    try:
        check_tasks(task_manager(settings), settings)
    except EvalError as exc:
        return exc
    return None


def _load_hint(settings: EvalSettings) -> str:
    if not settings.include_defaults:
        return f"rebuild the offline data: {_build_hint(settings, force=True)}"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    where = "HF_HUB_OFFLINE is set" if offline else "no Hugging Face hub here?"
    return f"stock tasks download from the Hugging Face hub ({where}); without it use eval=offline"


def check_tasks(manager, settings: EvalSettings) -> None:
    """Every requested name is a task or group `manager` knows (cheap: reads no data)."""
    for task in settings.tasks:
        if task not in manager.all_tasks:
            raise _unknown_task(task, manager, settings)


def scored_split(tasks) -> str | None:
    """The split lm-eval scores these (leaf) tasks on: test if a task has one, else validation ("a, b" if mixed)."""
    splits = {t.config.test_split or t.config.validation_split for t in tasks}
    return ", ".join(sorted(s for s in splits if s)) or None


def load_tasks(manager, settings: EvalSettings) -> tuple[list, dict[str, str | None]]:
    """Each requested task or group, built (its data loaded) now, so a missing dataset fails in one line; and the
    split each is scored on."""
    check_tasks(manager, settings)
    loaded, splits = [], {}
    for task in settings.tasks:
        try:
            built = manager.load([task])
        except Exception as exc:  # datasets, hub and YAML errors alike mean the task's data is not there
            raise EvalError(
                f"cannot load task {task!r} ({error_summary(exc, limit=400)}): {_load_hint(settings)}"
            ) from None
        loaded.append(built["groups"].get(task) or built["tasks"][task])
        splits[task] = scored_split(built["tasks"].values())
    return loaded, splits


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def task_metrics(raw: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.5, "acc_stderr": 0.1}."""
    out = {}
    for key, value in raw.items():
        metric, _, filter_name = key.partition(",")
        if filter_name == "none" and isinstance(value, int | float) and not isinstance(value, bool):
            out[metric] = _finite(value)
    return out


def task_accuracy_metric(scores: dict[str, Any], metric: str) -> str:
    """The accuracy a task contributes to the `metric` average: acc_norm where the task reports it, else acc."""
    return "acc_norm" if metric == "acc_norm" and "acc_norm" in scores else "acc"


def average_accuracy(scores: dict[str, dict[str, Any]], average, metric: str = "acc") -> float | None:
    """The `metric` average (acc, or acc_norm where reported) over the `average` tasks; None when any of those
    tasks (or its accuracy) is missing, never 0."""
    values = []
    for task in average:
        task_scores = scores.get(task) or {}
        values.append(task_scores.get(task_accuracy_metric(task_scores, metric)))
    if not values or any(not isinstance(v, int | float) or isinstance(v, bool) for v in values):
        return None
    return sum(values) / len(values)


def summarize(results: dict[str, Any], settings: EvalSettings, splits: dict[str, str | None] | None = None):
    """lm-eval's results -> our results.json keys: eval, avg_acc, avg_acc_norm, eval_splits."""
    scores = {task: task_metrics(results[task]) for task in settings.tasks if task in results}
    averages = {key: average_accuracy(scores, settings.average, metric) for metric, key in AVERAGES.items()}
    return {"eval": scores, **averages, "eval_splits": {t: s for t, s in (splits or {}).items() if t in scores}}


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval warns once per task (e.g. about num_fewshot); keep its errors only, and datasets' preparation bars
    off (~120 of them for the offline suite); restore both after."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(logging.ERROR, logger.getEffectiveLevel()))
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def evaluate_model(model, tokenizer, eval_cfg: dict[str, Any], manager=None) -> dict[str, Any]:
    """Score `model` (an egmla Transformer) on the suite `eval_cfg` describes, zero-shot unless num_fewshot.

    Runs where the model is (eval.device=auto) or on eval.device; leaves the model in eval mode. `manager`: a
    TaskManager from `task_manager(settings)` to reuse (indexing lm-eval's built-in tasks takes seconds)."""
    import lm_eval

    from .lm import EgmlaLM

    settings = EvalSettings.from_dict(eval_cfg)
    settings.require_tasks()
    with _quiet_lm_eval():
        manager = manager or task_manager(settings)
        tasks, splits = load_tasks(manager, settings)
        device = None if settings.device == "auto" else settings.device
        lm = EgmlaLM(model, tokenizer, batch_size=settings.batch_size, device=device)
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress notes: stdout stays ours
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=settings.num_fewshot,
                limit=settings.limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=settings.bootstrap_iters,
            )
    return summarize(out["results"], settings, splits)


def merge_results(path: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Set `update`'s keys in the JSON file at `path` (created if missing), keeping its other keys; atomic."""
    from ..train.rundir import write_json

    current = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except ValueError as exc:
            raise EvalError(f"{path} is not valid JSON ({exc}): fix or remove it, then evaluate again") from None
        if not isinstance(current, dict):
            raise EvalError(f"{path} does not hold a JSON object: fix or remove it, then evaluate again")
    merged = current | update
    write_json(path, merged)
    return merged


def evaluate_run(run_dir: str | Path, eval_cfg: dict[str, Any]) -> dict[str, Any]:
    """Load RUN_DIR's last checkpoint, evaluate it, merge its keys and eval_config into RUN_DIR/results.json."""
    from .load import load_run

    run_dir = Path(run_dir)
    settings = EvalSettings.from_dict(eval_cfg)
    settings.require_tasks()
    if run_dir.is_file():
        raise ConfigError(f"checkpoint={run_dir} is a file: pass its run directory (results.json goes there)")
    check_include_path(settings)  # before loading the model: the cheap mistakes first
    # A training or another evaluation writing this run's results.json must not race this one.
    with hold(run_dir, "run dir") if _is_run_dir(run_dir) else contextlib.nullcontext():
        model, tokenizer, _ = load_run(run_dir, device=settings.device)
        results = evaluate_model(model, tokenizer, _plain(eval_cfg))
        merge_results(run_dir / "results.json", {**results, "eval_config": _plain(eval_cfg)})
    return results


def _is_run_dir(path: Path) -> bool:
    """A folder to lock: a run directory (not a missing one, not a sharded checkpoint's folder)."""
    from ..train.fsdp import is_sharded_checkpoint

    return path.is_dir() and not is_sharded_checkpoint(path)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" if metric.startswith("acc") else f"{value:.4g}"


def format_table(results: dict[str, Any], settings: EvalSettings) -> str:
    """One row per task: headline metric and value, the split, then the task's other metrics (accuracies in
    percent); then both averages, the headline (eval.metric) first. (By hand: the last column is free text and the
    average rows span columns, which pandas' to_markdown / tabulate would not lay out; tabulate is no dependency.)"""
    width = max([len("task"), len(f"avg_acc_norm ({len(settings.average)} tasks)"), *(len(t) for t in settings.tasks)])
    splits = results.get("eval_splits") or {}
    lines = [f"{'task':<{width}}  {'metric':<16} {'value':>8}  {'split':<10}  other"]
    for task in settings.tasks:
        scores = results["eval"].get(task)
        if scores is None:
            lines.append(f"{task:<{width}}  {'(missing)':<16} {'-':>8}")
            continue
        metric = settings.column(task, scores)
        others = [f"{m} {_format_value(m, v)}" for m, v in scores.items() if m != metric and "stderr" not in m]
        value, split = _format_value(metric, scores.get(metric)), splits.get(task) or "-"
        lines.append(f"{task:<{width}}  {metric:<16} {value:>8}  {split:<10}  {', '.join(others)}".rstrip())
    for metric in sorted(AVERAGES, key=lambda m: m != settings.metric):
        label = f"{AVERAGES[metric]} ({len(settings.average)} tasks)"
        lines.append(f"{label:<{width}}  {'':<16} {_format_value('acc', results[AVERAGES[metric]]):>8}")
    return "\n".join(lines)


def split_checkpoint(argv: list[str]) -> tuple[Path, list[str]]:
    """(RUN_DIR of the one checkpoint=RUN_DIR argument, the Hydra overrides)."""
    given = [a for a in argv if a.startswith("checkpoint=")]
    if len(given) != 1 or not given[0].removeprefix("checkpoint="):
        raise ConfigError(f"pass exactly one checkpoint=RUN_DIR (an egmla-train run directory); {USAGE}")
    return Path(given[0].removeprefix("checkpoint=")), [a for a in argv if not a.startswith("checkpoint=")]


def compose_eval(overrides: list[str]) -> dict[str, Any]:
    """The resolved `eval` group of the root config under `overrides` (eval=offline works with or without a
    default `eval` entry in conf/train.yaml's defaults list)."""
    from omegaconf import OmegaConf

    from ..config import compose

    try:
        cfg = compose(overrides)
    except ConfigError as exc:
        if "No match in the defaults list" not in str(exc):
            raise
        cfg = compose([f"+{o}" if o.startswith("eval=") else o for o in overrides])
    if cfg.get("eval") is None:
        raise ConfigError("no evaluation suite selected: pass eval=offline (after `make eval-data`) or eval=paper")
    return OmegaConf.to_container(cfg.eval, resolve=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print("Score a trained run with lm-eval; the results merge into RUN_DIR/results.json.")
        print("Suites: eval=offline (local copies: `make eval-data` first), eval=paper (stock tasks: needs the hub).")
        return 0
    try:
        run_dir, overrides = split_checkpoint(argv)
        eval_cfg = compose_eval(overrides)
        settings = EvalSettings.from_dict(eval_cfg)
        settings.require_tasks()
        start = time.perf_counter()
        results = evaluate_run(run_dir, eval_cfg)
    except (ConfigError, FolderLocked) as exc:  # EvalError included; FolderLocked: a training writes the run
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results, settings))
    elapsed = time.perf_counter() - start
    print(f"eval={settings.name} limit={settings.limit}: {elapsed:.1f} s -> {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
