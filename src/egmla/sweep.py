"""`egmla-sweep sweeps/NAME.yaml`: run a wandb sweep spec on this machine, with no wandb server.

    egmla-sweep sweeps/table1_120m.yaml                                   # every trial of the grid
    egmla-sweep sweeps/table1_120m.yaml --eval "egmla-eval checkpoint={run_dir} eval=offline"
    egmla-sweep sweeps/gate_dim.yaml --dry-run                            # the trials and commands, nothing run
    egmla-sweep sweeps/demo_tiny.yaml -- train.max_steps=20               # extra overrides for every trial

The spec is the YAML that `wandb sweep` takes. Trials are proposed by wandb's own search engine, the `sweeps`
package (grid, random, bayes), which learns from the metric of each finished trial. Each trial is one process:
`--train-cmd` (default `python -m egmla.train`) with the overrides wandb's `${args_no_hyphens}` would give
(`KEY=VALUE`, one per parameter, in the spec's order), then the extra overrides, then `run_dir=<out>/<trial id>`,
so multi-GPU trainers work as they do from a shell. The spec's `command` is for `wandb agent` and is not run here.
After training, the optional `--eval` template runs (`{run_dir}`, `{trial}`, `{out}` are filled in); the trial's
metric is then read from its results.json (`val/loss` -> results["val"]["loss"]).

State lives in `<out>/sweep_state.json`: every trial with its parameters, status, metric and wall time. Rerunning
the same command resumes: finished trials are skipped, a trial whose run_dir has a results.json is not trained
again, and a trial that stopped mid-way continues from its last checkpoint (`resume=last`). A grid spec that only
gained values at the end of its lists (rows added to a study) continues the same way, training only the new points;
any other change of the spec is refused. Child output goes to
`<run_dir>/sweep.log`. Grid sweeps end when the grid is exhausted; random and bayes need `--max-trials` or the
spec's `run_cap`. One runner per sweep folder: a second one on the same `--out` is refused (`<out>/.lock`, an OS
lock that dies with its holder), and each trainer locks its own run dir. The children die with the runner (SIGTERM,
SIGINT, or the runner killed outright). Exit status: 0 all trials finished, 1 some failed, 2 a bad spec or command
line or a sweep folder in use, 130/143 interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from .lock import FolderLocked, hold
from .train.rundir import write_json

METHODS = ("grid", "random", "bayes")
STATE_FILE = "sweep_state.json"
LOG_FILE = "sweep.log"
DEFAULT_TRAIN_CMD = "python -m egmla.train"
# wandb metric names that results.json keeps under another path
METRIC_ALIASES = {"perf/tok_per_s": "train/tok_per_s", "perf/mfu": "train/mfu"}


class SweepError(Exception):
    """A problem with the spec, the state or the command line: reported in one line, exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the running child is stopped and the trial's state recorded."""


# ----------------------------------------------------------------------------------------------------- the spec


@dataclass
class Spec:
    path: Path
    config: dict[str, Any]

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def metric(self) -> str | None:
        return (self.config.get("metric") or {}).get("name")

    @property
    def goal(self) -> str:
        return (self.config.get("metric") or {}).get("goal", "minimize")

    @property
    def parameters(self) -> dict[str, Any]:
        return self.config["parameters"]

    def varying(self, params: dict[str, Any]) -> dict[str, Any]:
        """The values of the parameters that change between trials (constants left out), for display."""
        varying = [name for name, body in self.parameters.items() if "value" not in body]
        return {name: params[name] for name in varying if name in params} or params


def load_spec(path: str | Path) -> Spec:
    """Read and check a sweep spec; every problem is one SweepError line."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec {path} not found")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(config, dict):
        raise SweepError(f"{path} must be a YAML mapping with method, metric and parameters")
    method = config.get("method")
    if method not in METHODS:
        raise SweepError(f"{path}: method={method!r} is invalid: expected one of {', '.join(METHODS)}")
    params = config.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: 'parameters' must be a non-empty mapping of NAME: {{values: [...]}}")
    for name, body in params.items():
        _check_parameter(path, name, body)
    metric = config.get("metric")
    if metric is not None and not (isinstance(metric, dict) and metric.get("name")):
        raise SweepError(f"{path}: 'metric' must be a mapping with a name (and goal: minimize | maximize)")
    if metric and metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise SweepError(f"{path}: metric.goal={metric['goal']!r} is invalid: expected minimize or maximize")
    if method == "bayes" and not metric:
        raise SweepError(f"{path}: method=bayes needs a metric (name and goal) to learn from")
    _check_schema(path, config)
    return Spec(path, config)


def _check_parameter(path: Path, name: Any, body: Any) -> None:
    if not isinstance(body, dict):
        raise SweepError(f"{path}: parameter {name!r} must be a mapping such as {{values: [...]}} or {{value: x}}")
    if "parameters" in body:
        raise SweepError(
            f"{path}: parameter {name!r} is nested, which wandb would pass as a dict; use dotted names "
            f"such as {name}.KEY instead (Hydra overrides)"
        )


def _check_schema(path: Path, config: dict[str, Any]) -> None:
    """Validate against wandb's own sweep schema (the `sweeps` package)."""
    sweeps = _sweeps()
    try:
        sweeps.SweepConfig(config)
    except Exception as exc:  # jsonschema.ValidationError and friends
        message = getattr(exc, "message", None) or str(exc).splitlines()[0]
        raise SweepError(f"{path}: not a valid wandb sweep spec: {message}") from None


def _sweeps():
    """wandb's search engine. Its numpy<2 pin is stricter than it needs: install it with --no-deps."""
    try:
        with warnings.catch_warnings():  # sweeps 0.3 declares pydantic-v1 config keys: harmless warnings
            warnings.simplefilter("ignore")
            import sweeps
    except ImportError as exc:
        raise SweepError(
            f"wandb's search engine is missing ({exc}): pip install --no-deps sweeps==0.3.0 "
            "scipy scikit-learn jsonschema jsonref pydantic (or make setup)"
        ) from None
    return sweeps


def grid_size(spec: Spec) -> int:
    """Number of trials in a grid spec: the product of each parameter's number of values."""
    size = 1
    for body in spec.parameters.values():
        if "values" in body:
            size *= len(body["values"])
        elif body.get("distribution") == "int_uniform":
            size *= body["max"] - body["min"] + 1
        elif body.get("distribution") == "q_uniform":
            size *= math.ceil((body["max"] - body["min"]) / body["q"])  # sweeps: np.arange(min, max, q)
    return size


# ---------------------------------------------------------------------------------------------------- the trials


@dataclass
class Trial:
    id: str
    params: dict[str, Any]
    status: str = "pending"  # pending | running | finished | failed (train) | eval_failed
    metric: float | None = None
    wall_s: float = 0.0
    run_dir: str = ""
    returncode: int | None = None
    eval_returncode: int | None = None
    started: str | None = None
    ended: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status == "finished"


def overrides_of(params: dict[str, Any]) -> list[str]:
    """KEY=VALUE per parameter, formatted exactly as wandb's ${args_no_hyphens} does (f"{key}={value}")."""
    return [f"{key}={value}" for key, value in params.items()]


def params_of(run: Any, spec: Spec) -> dict[str, Any]:
    """A sweeps.SweepRun's parameter values, in the spec's order."""
    return {name: run.config[name]["value"] for name in spec.parameters if name in run.config}


def _sweep_run(trial: Trial, metric: str | None) -> Any:
    """A trial as wandb's search engine sees it: finished with its summary metric, failed, or pending."""
    sweeps = _sweeps()
    state = {"finished": "finished", "failed": "failed", "eval_failed": "failed"}.get(trial.status, "pending")
    summary = {metric: trial.metric} if metric and trial.metric is not None else {}
    config = {name: {"value": value} for name, value in trial.params.items()}
    return sweeps.SweepRun(name=trial.id, config=config, state=state, summary_metrics=summary)


def suggest(spec: Spec, trials: list[Trial], seed: int | None) -> dict[str, Any] | None:
    """The next trial's parameters from wandb's search engine; None when a grid is exhausted."""
    sweeps = _sweeps()
    if seed is not None:  # random and bayes draw from the global generators
        random.seed(seed + len(trials))
        import numpy as np

        np.random.seed((seed + len(trials)) % 2**32)
    runs = [_sweep_run(t, spec.metric) for t in trials]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GP's convergence warnings
        run = sweeps.next_run(spec.config, runs)
    return None if run is None else params_of(run, spec)


def read_metric(results: dict[str, Any], name: str | None) -> float | None:
    """A metric from results.json: `avg_acc` -> results["avg_acc"]; `val/loss` -> results["val"]["loss"]."""
    if not name:
        return None
    value: Any = results.get(name)
    if value is None:
        value = results
        for key in METRIC_ALIASES.get(name, name).split("/"):
            value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------------------------------- the state


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_state(out: Path, spec: Spec, extra: list[str]) -> list[Trial]:
    """Trials of an earlier invocation in `out` (none for a new sweep); refuses a state of another spec."""
    path = out / STATE_FILE
    if not path.is_file():
        return []
    try:
        state = json.loads(path.read_text())
        trials = [Trial(**t) for t in state["trials"]]
        for trial in trials:  # the folder may have been moved since: its trials live in it
            trial.run_dir = str(out / trial.id) if trial.run_dir else ""
    except (ValueError, KeyError, TypeError) as exc:
        raise SweepError(f"{path} is unreadable ({exc}): move it away to start the sweep afresh") from None
    grown = _grid_grew(state, spec)
    if grown:
        print(f"egmla-sweep: note: the grid grew by {grown} trial(s); the {len(trials)} in {out} keep their results")
    elif state.get("method") != spec.method or state.get("parameters") != spec.parameters:
        raise SweepError(
            f"{path} belongs to a sweep with other parameters or method (spec {state.get('spec')}): "
            f"use another --out, or remove {STATE_FILE} to start afresh"
        )
    if state.get("extra_overrides", []) != extra:
        print(
            f"egmla-sweep: note: extra overrides changed from {state.get('extra_overrides')} to {extra}; "
            "finished trials keep their results"
        )
    return trials


def _grid_grew(state: dict, spec: Spec) -> int:
    """How many trials a grid spec adds to the grid it was saved with, where it only appends values (the same
    parameters, each old value list a prefix of the new one, constants unchanged): rows added to a study, say a
    second seed. 0 otherwise, including for an unchanged spec."""
    old = state.get("parameters")
    if spec.method != "grid" or state.get("method") != "grid" or old == spec.parameters:
        return 0
    if not isinstance(old, dict) or list(old) != list(spec.parameters):
        return 0
    for name, body in spec.parameters.items():
        before = old[name]
        if "values" in body and "values" in before:
            appended = body["values"][: len(before["values"])] == before["values"]
            others = [{k: v for k, v in b.items() if k != "values"} for b in (body, before)]
            if not appended or others[0] != others[1]:
                return 0
        elif body != before:
            return 0
    return grid_size(spec) - grid_size(Spec(spec.path, {**spec.config, "parameters": old}))


def save_state(out: Path, spec: Spec, extra: list[str], trials: list[Trial]) -> None:
    """Write the state atomically (temp file + rename), so a crash never leaves half a file."""
    state = {
        "spec": str(spec.path),
        "name": spec.config.get("name", spec.path.stem),
        "method": spec.method,
        "metric": spec.config.get("metric"),
        "parameters": spec.parameters,
        "extra_overrides": extra,
        "updated": _now(),
        "trials": [asdict(t) for t in trials],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / STATE_FILE, state)


# ------------------------------------------------------------------------------------------------ running trials


@dataclass
class Runner:
    spec: Spec
    out: Path
    train_cmd: list[str]
    eval_template: str | None = None
    extra: list[str] = field(default_factory=list)
    dry_run: bool = False
    verbose: bool = False

    def run_dir(self, trial: Trial) -> Path:
        """<out>/<trial id>, wherever the folder was when the trial ran: a sweep folder copied or moved elsewhere
        (from a GPU machine, into experiments/) continues where it lands. trial.run_dir only records it."""
        return self.out / trial.id

    def train_command(self, trial: Trial) -> list[str]:
        run_dir = self.run_dir(trial)
        command = [*self.train_cmd, *overrides_of(trial.params), *self.extra, f"run_dir={run_dir}"]
        checkpoint = resume_checkpoint(run_dir)
        if checkpoint is not None:
            command.append("resume=last" if checkpoint.name == "last.ckpt" else f"resume={checkpoint}")
        return command

    def eval_command(self, trial: Trial) -> list[str] | None:
        if not self.eval_template:
            return None
        fill = {"run_dir": str(self.run_dir(trial)), "trial": trial.id, "out": str(self.out)}
        command = [_fill(token, fill) for token in shlex.split(self.eval_template)]
        return [own_program(command[0]), *command[1:]] if command else command

    def needs_eval(self, trial: Trial) -> bool:
        """An --eval command is given and has not yet succeeded on this trial's results."""
        if not self.eval_template or trial.eval_returncode == 0:
            return False
        return "eval" not in _read_json(self.run_dir(trial) / "results.json")

    def is_complete(self, trial: Trial) -> bool:
        return trial.done and not self.needs_eval(trial)

    def run(self, trial: Trial) -> None:
        """Train (unless results.json exists), evaluate (if asked and not done), read the metric."""
        run_dir = self.run_dir(trial)
        trial.run_dir, trial.started, trial.error = str(run_dir), _now(), None
        start = time.perf_counter()
        try:
            if not (run_dir / "results.json").is_file():
                trial.status = "running"
                trial.returncode = self._call(self.train_command(trial), run_dir)
                if trial.returncode != 0 or not (run_dir / "results.json").is_file():
                    trial.status = "failed"
                    trial.error = _last_line(run_dir / LOG_FILE) or f"exit status {trial.returncode}, no results.json"
                    return
            if self.needs_eval(trial):
                trial.eval_returncode = self._call(self.eval_command(trial), run_dir)
                if trial.eval_returncode != 0:
                    trial.status = "eval_failed"
                    trial.error = _last_line(run_dir / LOG_FILE) or f"eval exit status {trial.eval_returncode}"
                    return
            trial.metric = read_metric(_read_json(run_dir / "results.json"), self.spec.metric)
            trial.status = "finished"
        finally:
            trial.wall_s += time.perf_counter() - start
            trial.ended = _now()

    def _call(self, command: list[str], run_dir: Path) -> int:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / LOG_FILE, "a") as log:
            log.write(f"\n$ {shlex.join(command)}  # {_now()}\n")
            log.flush()
            # An interrupt inside subprocess.run kills the child before it propagates; the preexec_fn covers
            # the runner killed outright (SIGKILL), when no Python code runs.
            output = {} if self.verbose else {"stdout": log, "stderr": subprocess.STDOUT}
            try:
                return subprocess.run(command, preexec_fn=die_with_parent(), **output).returncode
            except OSError as exc:  # e.g. the program is not installed: the trial fails, the sweep goes on
                log.write(f"egmla-sweep: cannot run {command[0]!r}: {exc.strerror or exc}\n")
                return 127


def die_with_parent():
    """A preexec_fn that has Linux send SIGTERM to the child when the runner dies (prctl PR_SET_PDEATHSIG);
    None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # looked up before the fork

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the runner died before the prctl call
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to continue a stopped trial from (egmla-train keeps them in <run_dir>/checkpoints/)."""
    folder = run_dir / "checkpoints"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    return found[-1] if found else None


def _fill(token: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        token = token.replace("{" + key + "}", value)
    return token


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _last_line(path: Path) -> str | None:
    """The last non-empty line of a log (egmla's errors are one line), progress-bar carriage returns removed."""
    try:
        lines = [ln.split("\r")[-1].strip() for ln in path.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [ln for ln in lines if ln and not ln.startswith("$ ")]
    return lines[-1][:300] if lines else None


# ---------------------------------------------------------------------------------------------------- the sweep


def trial_limit(spec: Spec, max_trials: int | None) -> int:
    """How many trials the sweep runs in all: the grid (capped by --max-trials), or --max-trials / run_cap."""
    cap = max_trials if max_trials is not None else spec.config.get("run_cap")
    if spec.method == "grid":
        return min(grid_size(spec), cap) if cap else grid_size(spec)
    if not cap:
        raise SweepError(f"method={spec.method} has no end: pass --max-trials N (or set run_cap in {spec.path})")
    return int(cap)


def format_wall(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _metric_text(spec: Spec, trial: Trial) -> str:
    if not spec.metric:
        return ""
    return f"{spec.metric}={'—' if trial.metric is None else f'{trial.metric:.4f}'}"


def _outcome(spec: Spec, trial: Trial) -> str:
    parts = [trial.status, _metric_text(spec, trial), format_wall(trial.wall_s)]
    if trial.error and not trial.done:
        parts.append(f"({trial.error}; log: {Path(trial.run_dir) / LOG_FILE})")
    return " ".join(p for p in parts if p)


class TimeBudget:
    """--time-budget: start a trial only while the seconds left cover the longest trial seen so far (a GPU time
    slice, a batch job's limit); the trials not started are run by the next invocation of the same command."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.longest = 0.0
        self.stopped = False

    def allows(self, runner: Runner, trial: Trial) -> bool:
        if self.seconds is None or runner.dry_run or runner.is_complete(trial):
            return True
        left = self.seconds - (time.perf_counter() - self.start)
        if left >= self.longest and left > 0:
            return True
        if not self.stopped:
            print(
                f"egmla-sweep: {left:.0f} s left of --time-budget, a trial took up to {self.longest:.0f} s: "
                "stopping here; rerun the same command to continue",
                flush=True,
            )
        self.stopped = True
        return False

    def record(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def run_sweep(runner: Runner, limit: int, seed: int | None = None, budget: TimeBudget | None = None) -> list[Trial]:
    """Finished trials are reported, unfinished ones rerun, then new ones proposed until `limit` or exhaustion
    (or until the time budget cannot cover another trial)."""
    spec, out = runner.spec, runner.out
    budget = budget or TimeBudget(None)
    trials = load_state(out, spec, runner.extra)
    width = max(3, len(str(limit)))
    total = max(limit, len(trials))
    for index, trial in enumerate(trials, 1):
        if budget.allows(runner, trial):
            _process(runner, trial, trials, f"[{index}/{total}]", resumed=True, budget=budget)
    while len(trials) < limit and not budget.stopped:
        params = suggest(spec, trials, seed)
        if params is None:
            break
        trial = Trial(id=f"trial-{len(trials) + 1:0{width}d}", params=params)
        if not budget.allows(runner, trial):
            break
        trials.append(trial)
        _process(runner, trial, trials, f"[{len(trials)}/{total}]", resumed=False, budget=budget)
    return trials


def _process(
    runner: Runner, trial: Trial, trials: list[Trial], counter: str, resumed: bool, budget: TimeBudget | None = None
) -> None:
    spec = runner.spec
    head = f"{counter} {trial.id} {' '.join(overrides_of(spec.varying(trial.params)))}:"
    if runner.is_complete(trial):
        metric = read_metric(_read_json(runner.run_dir(trial) / "results.json"), spec.metric)
        trial.metric = trial.metric if metric is None else metric  # an evaluation may have added it since
        print(f"{head} {_outcome(spec, trial)} (done earlier)", flush=True)
        return
    if runner.dry_run:
        if (runner.run_dir(trial) / "results.json").is_file():
            print(f"{head} trained; would evaluate", flush=True)
        else:
            command = runner.train_command(trial)
            action = "would resume" if "resume=" in command[-1] else "would rerun" if resumed else "would run"
            print(f"{head} {action}: {shlex.join(command)}", flush=True)
        evaluation = runner.eval_command(trial)
        if evaluation:
            print(f"{' ' * len(counter)}   then: {shlex.join(evaluation)}", flush=True)
        trial.status = "pending"
        return
    trial.run_dir = str(runner.run_dir(trial))
    trial.status = "running"
    save_state(runner.out, spec, runner.extra, trials)  # a crash from here on reruns this trial
    print(head, end="\n" if runner.verbose else " ", flush=True)
    start = time.perf_counter()
    try:
        runner.run(trial)
        if budget is not None:
            budget.record(time.perf_counter() - start)
    except KeyboardInterrupt:
        trial.status, trial.error = "running", "interrupted"
        save_state(runner.out, spec, runner.extra, trials)
        print("interrupted: rerun the same command to resume", flush=True)
        raise
    save_state(runner.out, spec, runner.extra, trials)
    print(f"{head} {_outcome(spec, trial)}" if runner.verbose else _outcome(spec, trial), flush=True)


def summary(spec: Spec, trials: list[Trial], out: Path) -> str:
    """The final table of trials, the best one by the spec's metric, and how to build the report."""
    rows = [
        [
            t.id,
            t.status,
            _metric_text(spec, t).partition("=")[2] or "—",
            format_wall(t.wall_s),
            " ".join(overrides_of(spec.varying(t.params))),
        ]
        for t in trials
    ]
    header = ["trial", "status", spec.metric or "metric", "wall", "overrides"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    scored = [t for t in trials if t.done and t.metric is not None]
    if scored:
        pick = max if spec.goal == "maximize" else min
        best = pick(scored, key=lambda t: t.metric)
        lines.append(
            f"best: {best.id} {spec.metric}={best.metric:.4f} ({' '.join(overrides_of(spec.varying(best.params)))})"
        )
    done = sum(t.done for t in trials)
    lines.append(f"{done}/{len(trials)} trials finished; state: {out / STATE_FILE}")
    if done:
        lines.append(f"table: egmla-table {out} --out {out / 'table'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command line


def train_command(text: str) -> list[str]:
    """Split --train-cmd, its program resolved as own_program does."""
    command = shlex.split(text)
    if not command:
        raise SweepError("--train-cmd is empty")
    return [own_program(command[0]), *command[1:]]


def own_program(name: str) -> str:
    """A bare `python` is this interpreter, and a bare egmla-* command the one installed beside it, so a venv's
    trainer and evaluator run without the venv being activated; anything else is left to the PATH."""
    if name in ("python", "python3"):
        return sys.executable
    beside = Path(sys.executable).parent / name
    if name.startswith("egmla-") and "/" not in name and beside.is_file():
        return str(beside)
    return name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="egmla-sweep",
        description="Run a wandb sweep spec (sweeps/*.yaml) locally, without a wandb server: grid, random or "
        "bayes trials from wandb's own search engine, each trial a training process, resumable.",
        epilog='example: egmla-sweep sweeps/table1_120m.yaml --eval "egmla-eval checkpoint={run_dir} eval=offline"',
    )
    parser.add_argument("spec", help="sweep spec, e.g. sweeps/table1_120m.yaml")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every trial (after --)")
    parser.add_argument("--out", type=Path, default=None, help="sweep folder (default runs/sweeps/<spec name>)")
    parser.add_argument(
        "--eval",
        dest="eval_template",
        default=None,
        help="command run after each trial's training; {run_dir}, {trial}, {out} are filled in",
    )
    parser.add_argument("--max-trials", type=int, default=None, help="trials in all (random/bayes need it or run_cap)")
    parser.add_argument("--train-cmd", default=DEFAULT_TRAIN_CMD, help=f"trainer command (default {DEFAULT_TRAIN_CMD})")
    parser.add_argument("--seed", type=int, default=None, help="seed random/bayes proposals (reproducible trials)")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and their commands, run nothing")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no trial once the seconds left are fewer than the longest trial took (GPU time slices, job "
        "limits); exit 0 with the rest left for the next run of the same command",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="stream trial output here (else <run_dir>/sweep.log)"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # argparse mishandles `--` after a positional
    args = parser.parse_args(argv[: len(argv) - len(extra) - 1] if "--" in argv else argv)
    args.overrides = [*args.overrides, *extra]
    if args.max_trials is not None and args.max_trials < 1:
        parser.error(f"--max-trials={args.max_trials} is invalid: expected a positive integer")
    return args


@contextlib.contextmanager
def _on_sigterm(handler):
    """`handler` for SIGTERM while the block runs (the main thread only: elsewhere Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec)
        out = args.out or Path("runs/sweeps") / spec.path.stem
        limit = trial_limit(spec, args.max_trials)
        runner = Runner(
            spec,
            out,
            train_command(args.train_cmd),
            args.eval_template,
            list(args.overrides),
            dry_run=args.dry_run,
            verbose=args.verbose,
        )
        with contextlib.nullcontext() if args.dry_run else hold(out, "sweep folder"), _on_sigterm(_terminate):
            goal = f"; metric {spec.metric} ({spec.goal})" if spec.metric else ""
            what = "dry run, nothing is run" if args.dry_run else f"-> {out}"
            name = spec.config.get("name", spec.path.stem)
            print(f"egmla-sweep: {name} ({spec.method}, {limit} trials) {what}{goal}")
            budget = TimeBudget(args.time_budget)
            trials = run_sweep(runner, limit, args.seed, budget)
    except (SweepError, FolderLocked) as exc:
        print(f"egmla-sweep: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    if args.dry_run:
        return 0
    print("\n" + summary(spec, trials, out))
    if budget.stopped:  # left for the next slice, not failed
        return 0 if all(t.done or t.status in ("pending", "running") for t in trials) else 1
    return 0 if all(t.done for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
