"""`egmla-table RUN_DIRS... --out DIR`: the accuracy-vs-KV-cache table of finished runs, from their results.json.

    egmla-table runs/sweeps/table1_120m --out experiments/table1_120m --title "Table 1 (120M)"
    egmla-table runs/a runs/b runs/sweeps/scaling --out experiments/mine

Each RUN_DIR is a run directory or a folder searched recursively for results.json files. One row per run: model
size, attention, latent (d_c) and gate width, parameters (non-embedding, gate tables), KV-cache elements and
bytes per token, savings against MHA and MLA of the same model, training tokens, validation loss and bits per
byte, each evaluated task's accuracy and both average accuracies. Rows are sorted by model size, then KV bytes.

The headline accuracy is acc or acc_norm (--metric; default: the runs' eval.metric): the task columns show it
(acc_norm where the task reports it, acc elsewhere), its average comes first and is the one plotted and used
for the Pareto front. results.json files written before avg_acc_norm existed get both averages recomputed from
their per-task values and eval_config.average. A note under the table names every task scored on another split
than lm-eval's stock task (e.g. ARC on validation, as the offline suite once did).

The references are computed from each run's own resolved config with egmla.accounting: MHA is the same model
with attention=mha (2 x layers x d_model elements per token); MLA is the same model with attention=mla at its
size's defaults (latent model.attention_defaults.mla_kv_lora_rank, the run's RoPE key width).

Speed and time per row: steady tok/s and MFU (train.tok_per_s, train.mfu), train time = tokens / tok/s, and
"train loss @ T", each run's smoothed training loss at the shortest training time among the runs of its size
(egmla.report_curves, from the runs' metric logs). Runs whose resolved configs differ only in seed get a seed-spread
section: their val losses, mean and max - min.

Written to DIR: table.md (header: machines, GPUs, dates, git commits, the exact command), results.csv,
table.tex (booktabs), acc_vs_kv.png (average accuracy vs KV bytes/token with ±1 standard-error bars, Pareto
front marked, eval.limit written on it; skipped with a note when no run has accuracies), loss_vs_kv.png, and
loss_curves.png / loss_vs_time.png (training and validation loss vs tokens and vs training time; runs without
csv/version_N/metrics.csv logs are skipped with a note); when the runs span two model sizes or more,
loss_vs_params.png / loss_vs_flops.png and a Scaling section (egmla.report_scaling).
Missing values stay visibly missing: "—" in Markdown, "---" (an em dash) in LaTeX, an empty cell in the CSV; never 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import report_curves, report_scaling
from .eval.run import AVERAGES, average_accuracy, task_accuracy_metric

RESULTS = "results.json"
MISSING_MD = "—"
MISSING_TEX = "---"
# The paper's tasks: the split lm-eval's stock task scores, and the questions in each split that we have.
STOCK_SPLITS = {
    "piqa": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
    "hellaswag": "validation",
    "winogrande": "validation",
    "social_iqa": "validation",
    "mmlu": "test",
    "lambada_openai": "test",
    "wikitext": "test",
}
SPLIT_SIZES = {
    ("arc_easy", "test"): 2376,
    ("arc_easy", "validation"): 570,
    ("arc_challenge", "test"): 1172,
    ("arc_challenge", "validation"): 299,
}
# Offline tasks scored before results.json recorded eval_splits: the offline ARC copy then had validation only.
LEGACY_SPLITS = {"arc_easy_offline": "validation", "arc_challenge_offline": "validation"}


class ReportError(Exception):
    """Nothing to tabulate, or an unusable argument: one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ reading runs


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """results.json of each path: the file itself, the run directory's, or every one below a folder."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.is_file() and path.name == RESULTS:
            found[path.resolve()] = None
        elif (path / RESULTS).is_file():
            found[(path / RESULTS).resolve()] = None
        elif path.is_dir():
            for hit in sorted(path.rglob(RESULTS)):
                found[hit.resolve()] = None
        else:
            raise ReportError(f"{path} is neither a run directory nor a folder of runs")
    return list(found)


def load_results(path: Path) -> dict[str, Any] | None:
    """The parsed results.json, or None (with a one-line warning) when it is unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"egmla-table: warning: skipping {path}: {exc}", file=sys.stderr)
        return None
    if not isinstance(data, dict):
        print(f"egmla-table: warning: skipping {path}: not a JSON object", file=sys.stderr)
        return None
    return data


def _get(data: Any, *keys: str) -> Any:
    """data[k1][k2]...; None when any level is missing."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# ------------------------------------------------------------------------------------------------ KV references


def references(config: dict[str, Any]) -> tuple[int | None, int | None]:
    """KV elements per token of the run's model with MHA, and with MLA at its size's defaults (None: unknown)."""
    from . import accounting
    from .model import model_config_from_dicts

    model, attention = config.get("model"), config.get("attention") or {}
    if not isinstance(model, dict):
        return None, None
    defaults = model.get("attention_defaults") or {}

    def elements(attn: dict[str, Any]) -> int | None:
        try:
            return accounting.kv_elements_per_token(model_config_from_dicts(model, attn))
        except Exception:  # a config this version cannot build: leave the saving missing
            return None

    mha = elements({"variant": "mha"})
    rope = attention.get("qk_rope_head_dim") or defaults.get("rope_head_dim")
    mla = None
    if defaults.get("mla_kv_lora_rank") and rope:
        mla = elements(
            {
                "variant": "mla",
                "kv_lora_rank": defaults["mla_kv_lora_rank"],
                "qk_rope_head_dim": rope,
                "qk_nope_head_dim": defaults.get("head_dim", 64),
                "v_head_dim": defaults.get("head_dim", 64),
            }
        )
    return mha, mla


def saving(elements: float | None, reference: int | None) -> float | None:
    """Fraction of the reference's KV cache saved (0.9167 = 91.67% smaller); None when either is unknown."""
    if elements is None or not reference:
        return None
    return round(1.0 - elements / reference, 6)


# -------------------------------------------------------------------------------------------------------- rows


@dataclass
class Run:
    """One row of the table: everything read or derived from one results.json."""

    path: Path
    data: dict[str, Any]
    row: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float | None] = field(default_factory=dict)  # task -> its column's value
    columns: dict[str, str] = field(default_factory=dict)  # task -> the metric of its column
    metric: str = "acc"  # the headline accuracy: row["avg"] is its average

    @property
    def config(self) -> dict[str, Any]:
        return self.data.get("config") or {}


def column_metric(data: dict[str, Any], task: str, metric: str) -> str:
    """The metric shown for `task`: a non-accuracy eval_config.metrics entry (e.g. word_perplexity), else the
    headline accuracy as averaged (older results.json files named acc/acc_norm per task there: superseded)."""
    chosen = (_get(data, "eval_config", "metrics") or {}).get(task)
    if chosen and chosen not in AVERAGES:
        return chosen
    return task_accuracy_metric(_get(data, "eval", task) or {}, metric)


def averages(data: dict[str, Any]) -> dict[str, float | None]:
    """avg_acc and avg_acc_norm as egmla-eval wrote them; for files from before avg_acc_norm, both recomputed from
    the per-task values over eval_config.average (then avg_acc is acc's mean whatever the old per-task choice)."""
    average = _get(data, "eval_config", "average")
    if "avg_acc_norm" in data or not average or not isinstance(data.get("eval"), dict):
        return {key: _number(data.get(key)) for key in AVERAGES.values()}
    recomputed = {key: _number(average_accuracy(data["eval"], average, m)) for m, key in AVERAGES.items()}
    if recomputed["avg_acc"] is None:  # a task's accuracy is missing: keep what egmla-eval wrote
        recomputed["avg_acc"] = _number(data.get("avg_acc"))
    return recomputed


def average_stderr(data: dict[str, Any], metric: str) -> float | None:
    """The standard error of the `metric` average over eval_config.average: sqrt(sum se_i^2) / n, each se_i lm-eval's
    stderr of the accuracy that task contributes (the tasks' examples are disjoint, so their errors are independent
    and add in quadrature). None when the average's tasks or any of their stderrs are unknown."""
    average, scores = _get(data, "eval_config", "average"), data.get("eval")
    if not average or not isinstance(scores, dict):
        return None
    errors = []
    for task in average:
        task_scores = scores.get(task) or {}
        errors.append(_number(task_scores.get(f"{task_accuracy_metric(task_scores, metric)}_stderr")))
    if any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def eval_splits(data: dict[str, Any]) -> dict[str, str]:
    """task -> the split it was scored on: results.json's eval_splits, else (older files) what it must have been."""
    if isinstance(data.get("eval_splits"), dict):
        return {task: split for task, split in data["eval_splits"].items() if isinstance(split, str)}
    return {task: LEGACY_SPLITS[task] for task in data.get("eval") or {} if task in LEGACY_SPLITS}


def make_run(path: Path, data: dict[str, Any], metric: str = "acc") -> Run:
    config = data.get("config") or {}
    attention = config.get("attention") or {}
    variant = attention.get("variant")
    latent = variant in ("mla", "egmla")
    elements = _number(_get(data, "kv", "elements_per_token"))
    mha, mla = references(config)
    tokens, tok_per_s = _number(_get(data, "train", "tokens")), _number(_get(data, "train", "tok_per_s"))
    run = Run(path=path, data=data, metric=metric)
    run.row = {
        "run": data.get("run_name") or path.parent.name,
        "experiment": data.get("experiment_name"),
        "size": _get(config, "model", "name"),
        "attention": attention.get("name") or variant,
        "variant": variant,
        "kv_lora_rank": attention.get("kv_lora_rank") if latent else None,
        "gate_dim": attention.get("gate_dim") if variant == "egmla" and attention.get("gate_enabled", True) else None,
        "params_non_embedding": _get(data, "params", "non_embedding"),
        "params_gate_tables": _get(data, "params", "gate_tables"),
        "params_total": _get(data, "params", "total"),
        "kv_elements_per_token": _get(data, "kv", "elements_per_token"),
        "kv_bytes_per_token": _get(data, "kv", "bytes_per_token"),
        "kv_dtype": _get(data, "kv", "dtype"),
        "saving_vs_mha": saving(elements, mha),
        "saving_vs_mla": saving(elements, mla),
        "train_tokens": _get(data, "train", "tokens"),
        "val_loss": _number(_get(data, "val", "loss")),
        "val_bpb": _number(_get(data, "val", "bpb")),
        "seed": config.get("seed"),
        "tok_per_s": tok_per_s,
        "mfu": _number(_get(data, "train", "mfu")),
        "train_time_s": tokens / tok_per_s if tokens and tok_per_s else None,
        "equal_time_s": None,  # these two from the metric logs: report_curves.equal_time
        "train_loss_at_equal_time": None,
    }
    for task, metrics in (data.get("eval") or {}).items():
        run.columns[task] = column_metric(data, task, metric)
        run.scores[task] = _number((metrics or {}).get(run.columns[task]))
    run.row |= averages(data)
    run.row["avg"] = run.row[AVERAGES[metric]]  # the headline: plotted, and the Pareto front's
    run.row["avg_stderr"] = average_stderr(data, metric) if run.row["avg"] is not None else None
    run.row["run_dir"] = _display_path(path.parent)
    return run


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def task_columns(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """(task, column metric) of every task any run was scored on, in the order of the runs' suites. A task whose
    runs show different metrics (acc_norm missing from some) gets one column per metric."""
    columns: dict[tuple[str, str], None] = {}
    for run in runs:
        order = list(_get(run.data, "eval_config", "tasks") or []) + list(run.scores)
        for task in order:
            if task in run.scores:
                columns[(task, run.columns[task])] = None
    return list(columns)


def cell(run: Run, task: str, metric: str) -> float | None:
    return run.scores.get(task) if run.columns.get(task) == metric else None


def size_key(run: Run) -> tuple:
    """Sort key: model size (layers x d_model^2, the same for every variant of one size), then KV bytes."""
    model = run.config.get("model") or {}
    scale = (model.get("n_layers") or 0) * (model.get("d_model") or 0) ** 2 or math.inf
    kv = run.row["kv_bytes_per_token"]
    return (scale, str(run.row["size"]), math.inf if kv is None else kv, str(run.row["attention"]), run.row["run"])


def chosen_metrics(found: Sequence[dict[str, Any]]) -> Counter:
    """eval.metric of each evaluated run (acc for files from before eval.metric existed)."""
    return Counter(_get(d, "eval_config", "metric") or "acc" for d in found if d.get("eval"))


def collect(paths: Iterable[str | Path], metric: str | None = None) -> list[Run]:
    """Every run under `paths`, sorted by model size, then KV bytes per token, tabled with headline `metric`
    (default: the runs' eval.metric, the most common one where they differ)."""
    paths = list(paths)
    found = [(p, d) for p in find_results(paths) if (d := load_results(p)) is not None]
    if not found:
        raise ReportError(f"no {RESULTS} found under {' '.join(map(str, paths))}")
    if metric is None:
        counts = chosen_metrics([d for _, d in found])
        metric = max(sorted(counts), key=counts.get) if counts else "acc"
    if metric not in AVERAGES:
        raise ReportError(f"--metric {metric} is invalid: expected acc or acc_norm")
    return sorted((make_run(p, d, metric) for p, d in found), key=size_key)


# ------------------------------------------------------------------------------------------------ Pareto front


def pareto_front(points: Sequence[tuple[float | None, float | None]], maximize: bool = True) -> list[bool]:
    """For (cost, value) points: True where no other point has cost <= and a better-or-equal value, with one
    of the two strictly better. Lower cost is better; higher value when `maximize`, else lower. Points with a
    missing coordinate are never on the front."""

    def better_or_equal(a: float, b: float) -> bool:
        return a >= b if maximize else a <= b

    flags = []
    for i, (cost, value) in enumerate(points):
        if cost is None or value is None:
            flags.append(False)
            continue
        dominated = any(
            j != i
            and c is not None
            and v is not None
            and c <= cost
            and better_or_equal(v, value)
            and (c < cost or v != value)
            for j, (c, v) in enumerate(points)
        )
        flags.append(not dominated)
    return flags


# ------------------------------------------------------------------------------------------------ seed spread

SEED_IGNORED = ("seed", "run_name", "run_dir", "resume")  # resume=last: the same training, continued


def _without_nulls(config):
    """config without its null settings (and sections left empty), at any depth: an option a later version added,
    off by default, leaves a run of that version the same training as one from before it (train.profile_steps)."""
    if not isinstance(config, dict):
        return config
    kept = {k: _without_nulls(v) for k, v in config.items() if v is not None}
    return {k: v for k, v in kept.items() if v != {}}


def seed_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs whose resolved configs are equal but for SEED_IGNORED and null settings, and that hold two seeds or
    more, in table order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.config:
            rest = _without_nulls({k: v for k, v in run.config.items() if k not in SEED_IGNORED})
            groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(run)
    return [group for group in groups.values() if len({repr(r.row["seed"]) for r in group}) > 1]


def _seed_key(run: Run) -> tuple:
    seed = run.row["seed"]
    return (not isinstance(seed, int), seed if isinstance(seed, int) else 0, str(seed), run.row["run"])


def seed_spread(runs: Sequence[Run]) -> list[str]:
    """table.md's seed-spread section: each seed group's val loss per seed, mean and max - min."""
    lines = ["", "## Seed spread", ""]
    groups = seed_groups(runs)
    if not groups:
        return lines + ["No runs differ only in seed (train a row with another seed to measure the spread)."]
    lines += [
        "Runs whose resolved configs differ only in seed (run_dir, run_name and resume ignored): val loss per "
        "seed, mean and spread (max - min). A difference between rows smaller than the spread is within seed noise.",
        "",
        "| size | attention | val loss by seed | mean | spread |",
        "|---|---|---|---:|---:|",
    ]
    for group in groups:
        ordered = sorted(group, key=_seed_key)
        by_seed = ", ".join(f"{r.row['seed']}: {_fmt_float(r.row['val_loss']) or MISSING_MD}" for r in ordered)
        losses = [r.row["val_loss"] for r in group if r.row["val_loss"] is not None]
        mean = sum(losses) / len(losses) if losses else None
        spread = max(losses) - min(losses) if len(losses) > 1 else None
        cells = [group[0].row["size"], group[0].row["attention"], by_seed, _fmt_float(mean), _fmt_float(spread)]
        lines.append("| " + " | ".join(MISSING_MD if c is None else str(c) for c in cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------- formatting


def _fmt_int(value: Any) -> str | None:
    return None if _number(value) is None else f"{int(value):,}"


def _fmt_params(value: Any) -> str | None:
    if _number(value) is None:
        return None
    if value == 0:
        return "0"
    return f"{value / 1e6:,.2f}M" if value >= 1e6 else f"{value / 1e3:,.1f}K"


def _fmt_tokens(value: Any) -> str | None:
    if _number(value) is None:
        return None
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{int(value)}"


def _fmt_percent(value: Any) -> str | None:
    return None if _number(value) is None else f"{100 * value:.2f}%"


def _fmt_float(value: Any) -> str | None:
    return None if _number(value) is None else f"{value:.4f}"


def _fmt_metric(metric: str, value: Any) -> str | None:
    """Accuracies (lm-eval fractions) in percent, anything else (perplexity) as is."""
    if _number(value) is None:
        return None
    return f"{100 * value:.2f}" if metric.startswith("acc") else f"{value:.4g}"


def _task_label(task: str) -> str:
    return task.removesuffix("_offline")


def average_columns(runs: Sequence[Run]) -> list[str]:
    """The averages to show: the headline first, the other where any run has it."""
    metric = runs[0].metric
    other = [m for m in AVERAGES if m != metric and any(r.row[AVERAGES[m]] is not None for r in runs)]
    return [metric, *other]


def display_columns(runs: Sequence[Run], front: list[bool]) -> tuple[list[str], list[list[str | None]]]:
    """Header and cells (None = missing) of the Markdown / LaTeX table."""
    tasks = task_columns(runs)
    dtype = next((r.row["kv_dtype"] for r in runs if r.row["kv_dtype"]), "bf16")
    header = [
        "size",
        "attention",
        "d_c",
        "gate",
        "non-emb params",
        "gate tables",
        "KV el/token",
        f"KV B/token ({dtype})",
        "vs MHA",
        "vs MLA",
        "tokens",
        "tok/s",
        "MFU",
        "train time",
        "val loss",
        "val bpb",
        "train loss @ T",
    ]
    header += [_task_label(t) if m == "acc" else f"{_task_label(t)} ({m})" for t, m in tasks]
    shown = average_columns(runs)
    header += [f"avg {m}" for m in shown]
    any_acc = any(r.row["avg"] is not None for r in runs)
    if any_acc:
        header += ["Pareto"]
    rows = []
    for run, on_front in zip(runs, front, strict=True):
        r = run.row
        cells = [
            r["size"],
            r["attention"],
            _fmt_int(r["kv_lora_rank"]),
            _fmt_int(r["gate_dim"]),
            _fmt_params(r["params_non_embedding"]),
            _fmt_params(r["params_gate_tables"]),
            _fmt_int(r["kv_elements_per_token"]),
            _fmt_int(r["kv_bytes_per_token"]),
            _fmt_percent(r["saving_vs_mha"]),
            _fmt_percent(r["saving_vs_mla"]),
            _fmt_tokens(r["train_tokens"]),
            _fmt_int(r["tok_per_s"]),
            _fmt_percent(r["mfu"]),
            None if r["train_time_s"] is None else report_curves.format_seconds(r["train_time_s"]),
            _fmt_float(r["val_loss"]),
            _fmt_float(r["val_bpb"]),
            _fmt_float(r["train_loss_at_equal_time"]),
        ]
        cells += [_fmt_metric(m, cell(run, t, m)) for t, m in tasks]
        cells += [_fmt_metric("acc", r[AVERAGES[m]]) for m in shown]
        if any_acc:
            cells += ["yes" if on_front else ""]
        rows.append([None if c is None else str(c) for c in cells])
    return header, rows


# ------------------------------------------------------------------------------------------------------ header


def provenance(runs: Sequence[Run], argv: Sequence[str]) -> list[str]:
    """Lines stating the command, machines, GPUs, run dates and git commits behind the table."""
    machines = Counter()
    for run in runs:
        m = run.data.get("machine") or {}
        gpus = Counter(m.get("gpus") or [])
        gpu_text = ", ".join(f"{n} x {name}" for name, n in gpus.items()) or "no GPU"
        devices = _get(run.data, "train", "devices")
        used = f", {devices} device(s) used" if devices else ""
        machines[f"{m.get('host', 'unknown host')} ({gpu_text}; {m.get('cpus', '?')} CPUs{used})"] += 1
    commits = Counter()
    for run in runs:
        git = run.data.get("git") or {}
        commit = (git.get("commit") or "unknown")[:12]
        commits[commit + (" (uncommitted changes)" if git.get("dirty") else "")] += 1
    dates = sorted(d for d in (run.data.get("date") for run in runs) if d)
    date_text = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} .. {dates[-1]}") if dates else "unknown"
    return [
        f"- command: `{shlex.join(['egmla-table', *argv])}`",
        f"- table built: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- runs: {len(runs)}, trained {date_text}",
        "- machines: " + "; ".join(f"{k} x{n}" if n > 1 else k for k, n in machines.items()),
        "- git commits: " + ", ".join(f"{k} x{n}" if n > 1 else k for k, n in commits.items()),
    ]


def split_notes(runs: Sequence[Run]) -> list[str]:
    """One line per task scored on another split than lm-eval's stock task, with how many runs did so."""
    evaluated = [r for r in runs if r.data.get("eval")]
    other: Counter = Counter()
    for run in evaluated:
        for task, split in eval_splits(run.data).items():
            stock = STOCK_SPLITS.get(_task_label(task))
            if stock and split != stock:
                other[(_task_label(task), split, stock)] += 1
    lines = []
    for (task, split, stock), n in other.items():
        size, stock_size = SPLIT_SIZES.get((task, split)), SPLIT_SIZES.get((task, stock))
        sized = f"{split} split ({size:,})" if size else f"{split} split"
        stock_sized = f"{stock} split ({stock_size:,})" if stock_size else f"{stock} split"
        lines.append(
            f"Split: {task} scored on its {sized}, not the stock {stock_sized}, in {n} of {len(evaluated)} "
            "evaluated runs."
        )
    return lines


def speed_notes(runs: Sequence[Run]) -> list[str]:
    """What the speed columns and train loss @ T hold, with T of each model size."""
    lines = []
    if any(r.row["tok_per_s"] is not None for r in runs):
        lines.append(
            "Speed: tok/s and MFU at steady state (every throughput window but the first, which holds compilation "
            "and warm-up; validation and checkpoint writes left out); train time = tokens / tok/s, wall clock on "
            "the run's devices."
        )
    shortest = {str(r.row["size"]): r.row["equal_time_s"] for r in runs if r.row["equal_time_s"] is not None}
    if shortest:
        at = ", ".join(f"{report_curves.format_seconds(t)} ({size})" for size, t in shortest.items())
        lines.append(
            f"train loss @ T (quality at equal training time): each run's training loss "
            f"({report_curves.SMOOTHING_TEXT}, linearly interpolated) at T, the shortest training time (the time "
            f"axis of {report_curves.TIME_PNG}) among the runs of its size with metric logs: T = {at}. Slower "
            "runs are read mid-schedule (learning rate not yet decayed), which overstates their loss at T against "
            "a schedule made to end there."
        )
    return lines


def notes(runs: Sequence[Run]) -> list[str]:
    metric = runs[0].metric
    lines = [
        "KV: cache elements per token summed over layers (MLA/EG-MLA: latent d_c + RoPE key); bytes at the "
        "dtype shown. Savings: KV cache vs the same model with MHA (2 x layers x d_model) and with MLA at the "
        "size's default latent (model.attention_defaults.mla_kv_lora_rank). Gate tables are token-id lookups "
        "recomputed at inference, not cache.",
        f"Accuracies in percent (lm-eval); headline {metric}: the task columns, the first average, the Pareto "
        f"column and the plot. avg acc: mean acc over the averaged tasks; avg acc_norm: acc_norm where the task "
        f"defines it (piqa, arc, hellaswag), acc elsewhere. {MISSING_MD}: not measured. Pareto: on the front of "
        f"avg {metric} vs KV bytes/token.",
    ]
    chosen = chosen_metrics([r.data for r in runs])
    if len(chosen) > 1:
        counts = ", ".join(f"{m} x{n}" for m, n in sorted(chosen.items()))
        lines.append(f"The runs chose different eval.metric ({counts}): tabled with {metric} (--metric chooses).")
    lines += split_notes(runs)
    lines += speed_notes(runs)
    limits = {_get(r.data, "eval_config", "limit") for r in runs if r.data.get("eval")} - {None}
    if limits:
        lines.append(
            f"WARNING: evaluated on a subset (eval.limit={', '.join(map(str, sorted(limits)))}): "
            "a smoke test, not a reproduction."
        )
    return lines


# ------------------------------------------------------------------------------------------------------ writers


def write_markdown(
    path: Path, title: str, runs: Sequence[Run], front: list[bool], argv: Sequence[str], plots: list[str]
) -> None:
    # Not DataFrame.to_markdown / Styler.to_latex: to_markdown needs tabulate (no egmla dependency), the cells are
    # already formatted strings with visible missing values, and the LaTeX puts a \midrule between model sizes.
    header, rows = display_columns(runs, front)
    numeric = [i >= 2 for i in range(len(header))]
    lines = [f"# {title}", "", *provenance(runs, argv), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    lines += ["| " + " | ".join(MISSING_MD if c is None else c for c in row) + " |" for row in rows]
    lines += ["", *notes(runs), "", "Runs (same order):", ""]
    lines += [f"{i}. `{r.row['run_dir']}` ({r.row['run']})" for i, r in enumerate(runs, 1)]
    lines += ["", *plots] if plots else []
    path.write_text("\n".join(lines) + "\n")


CSV_FIELDS = [
    "run",
    "experiment",
    "run_dir",
    "size",
    "attention",
    "variant",
    "kv_lora_rank",
    "gate_dim",
    "params_non_embedding",
    "params_gate_tables",
    "params_total",
    "kv_elements_per_token",
    "kv_bytes_per_token",
    "kv_dtype",
    "saving_vs_mha",
    "saving_vs_mla",
    "train_tokens",
    "val_loss",
    "val_bpb",
    "seed",
    "tok_per_s",
    "mfu",
    "train_time_s",
    "equal_time_s",
    "train_loss_at_equal_time",
]


def write_csv(path: Path, runs: Sequence[Run], front: list[bool]) -> None:
    """Machine-readable rows: raw values (fractions, not percent); missing values are empty cells. headline names
    the average that pareto_acc_vs_kv (and the plot) used."""
    tasks = task_columns(runs)
    fields = CSV_FIELDS + [f"{t}/{m}" for t, m in tasks] + ["avg_acc", "avg_acc_norm", "headline", "pareto_acc_vs_kv"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for run, on_front in zip(runs, front, strict=True):
            values = [run.row.get(k) for k in CSV_FIELDS] + [cell(run, t, m) for t, m in tasks]
            values += [run.row["avg_acc"], run.row["avg_acc_norm"], AVERAGES[run.metric]]
            values += [on_front if run.row["avg"] is not None else None]
            writer.writerow(["" if v is None else v for v in values])


TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex_escape(text: str) -> str:
    return re.sub(r"[\\&%$#_{}~^]", lambda m: TEX_SPECIAL[m.group()], text)


def write_latex(path: Path, title: str, runs: Sequence[Run], front: list[bool]) -> None:
    """A booktabs table (\\usepackage{booktabs}); missing values are --- (an em dash)."""
    header, rows = display_columns(runs, front)
    spec = "ll" + "r" * (len(header) - 2)
    lines = [
        "% egmla-table: needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{_tex_escape(title)}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(_tex_escape(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    previous_size = None
    for run, row in zip(runs, rows, strict=True):
        if previous_size is not None and run.row["size"] != previous_size:
            lines.append("\\midrule")
        previous_size = run.row["size"]
        lines.append(" & ".join(MISSING_TEX if c is None else _tex_escape(c) for c in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    path.write_text("\n".join(lines) + "\n")


# -------------------------------------------------------------------------------------------------------- plots


def accuracy_points(runs: Sequence[Run]) -> tuple[list[float | None], list[float | None]]:
    """The plotted headline averages and their error bars (+-1 standard error), in percent; None where missing."""
    values = [None if r.row["avg"] is None else 100 * r.row["avg"] for r in runs]
    errors = [
        None if v is None or r.row["avg_stderr"] is None else 100 * r.row["avg_stderr"]
        for r, v in zip(runs, values, strict=True)
    ]
    return values, errors


def accuracy_caveat(runs: Sequence[Run], errors: Sequence[float | None]) -> str:
    """What the accuracies rest on, written on the figure: eval.limit subsets or full splits, and the bars."""
    limits = list(dict.fromkeys(_get(r.data, "eval_config", "limit") for r in runs if r.row["avg"] is not None))
    if limits == [None]:
        scored = "full task splits"
    else:
        given = ", ".join("none" if limit is None else f"{limit:g}" for limit in limits)
        scored = f"subsets: eval.limit={given} examples per task (MMLU: per subject), not the full splits"
    if all(e is None for e in errors):
        bars = "no standard errors in results.json: no error bars"
    else:
        bars = "bars: ±1 standard error of the average (lm-eval's per-task stderr, sqrt(sum se^2)/n)"
    return f"Accuracies from {scored}; {bars}."


def figure_vs_kv(
    runs: Sequence[Run],
    values: list[float | None],
    front: list[bool],
    ylabel: str,
    title: str,
    errors: Sequence[float | None] | None = None,
    note: str | None = None,
):
    """Value vs KV bytes/token (log x), one colour per model size, each point labelled, the front circled and
    joined; `errors` as vertical bars, `note` written under the axes. Every legend entry is a drawn artist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=150)
    sizes = list(dict.fromkeys(str(r.row["size"]) for r in runs))
    colours = {s: f"C{i % 10}" for i, s in enumerate(sizes)}
    labelled: set[str] = set()
    errors = errors or [None] * len(runs)
    for run, value, error in zip(runs, values, errors, strict=True):
        kv, size = run.row["kv_bytes_per_token"], str(run.row["size"])
        if kv is None or value is None:
            continue
        label = None if size in labelled else f"model {size}"
        labelled.add(size)
        ax.scatter(kv, value, color=colours[size], s=36, zorder=3, label=label)
        if error is not None:
            ax.errorbar(kv, value, yerr=error, fmt="none", ecolor=colours[size], elinewidth=1, capsize=3, zorder=2)
        ax.annotate(str(run.row["attention"]), (kv, value), textcoords="offset points", xytext=(5, 4), fontsize=7)
    points = sorted((r.row["kv_bytes_per_token"], v) for r, v, f in zip(runs, values, front, strict=True) if f)
    if points:
        xs, ys = zip(*points, strict=True)
        ax.step(xs, ys, where="post", color="black", linewidth=1, linestyle="--", zorder=2)
        # the circles carry the legend entry: a front of one point has no visible line
        ax.scatter(xs, ys, facecolors="none", edgecolors="black", s=110, zorder=4, label="Pareto front")
    ax.set_xscale("log")
    ticks: list[int] = []
    for kv in sorted({r.row["kv_bytes_per_token"] for r, v in zip(runs, values, strict=True) if v is not None}):
        if not ticks or kv / ticks[-1] > 1.15:  # labels of nearby points would overlap
            ticks.append(kv)
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks], fontsize=7, rotation=30)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"KV cache bytes per token ({runs[0].row['kv_dtype'] or 'bf16'}, all layers; log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=6.5, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    return fig


def plot_vs_kv(path: Path, *args, **kwargs) -> None:
    """figure_vs_kv(*args, **kwargs), saved to `path`."""
    import matplotlib.pyplot as plt

    fig = figure_vs_kv(*args, **kwargs)
    fig.savefig(path)
    plt.close(fig)


def write_plots(out: Path, title: str, runs: Sequence[Run], front: list[bool]) -> list[str]:
    """The PNGs, and the lines table.md shows about them."""
    lines = []
    accs, errors = accuracy_points(runs)
    if any(a is not None for a in accs):
        ylabel = f"average accuracy (%, {runs[0].metric}{' where defined' if runs[0].metric == 'acc_norm' else ''})"
        note = accuracy_caveat(runs, errors)
        plot_vs_kv(out / "acc_vs_kv.png", runs, accs, front, ylabel, f"{title}: accuracy vs KV", errors, note)
        lines.append("![average accuracy vs KV bytes/token](acc_vs_kv.png)")
        lines.append(note)
    else:
        lines.append("No run has accuracies (run egmla-eval on them): acc_vs_kv.png is not drawn.")
    losses = [r.row["val_loss"] for r in runs]
    if any(v is not None for v in losses):
        loss_front = pareto_front(
            [(r.row["kv_bytes_per_token"], v) for r, v in zip(runs, losses, strict=True)], maximize=False
        )
        plot_vs_kv(
            out / "loss_vs_kv.png",
            runs,
            losses,
            loss_front,
            "validation loss (nats/token)",
            f"{title}: validation loss vs KV",
        )
        lines.append("![validation loss vs KV bytes/token](loss_vs_kv.png)")
    return lines


# ------------------------------------------------------------------------------------------------ command line


def build(runs: Sequence[Run], out: Path, title: str, argv: Sequence[str] = ()) -> None:
    """Write every output for the (sorted) runs into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front([(r.row["kv_bytes_per_token"], r.row["avg"]) for r in runs], maximize=True)
    plots = (
        write_plots(out, title, runs, front)
        + report_curves.add_curves(out, title, runs)
        + report_scaling.add_scaling(out, title, runs)
        + seed_spread(runs)
    )
    write_markdown(out / "table.md", title, runs, front, argv, plots)
    write_csv(out / "results.csv", runs, front)
    write_latex(out / "table.tex", title, runs, front)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="egmla-table",
        description="Accuracy-vs-KV-cache table (Markdown, CSV, LaTeX) and plots from runs' results.json files.",
        epilog="example: egmla-table runs/sweeps/table1_120m --out experiments/table1_120m --title 'Table 1'",
    )
    parser.add_argument("runs", nargs="+", help="run directories, or folders searched recursively for results.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for table.md, results.csv, table.tex, PNGs")
    parser.add_argument("--title", default=None, help="table title (default: the runs' experiment names)")
    parser.add_argument(
        "--metric",
        choices=sorted(AVERAGES),
        default=None,
        help="headline accuracy: acc, or acc_norm where the task defines it (default: the runs' eval.metric)",
    )
    args = parser.parse_args(argv)
    try:
        runs = collect(args.runs, args.metric)
        title = args.title or ", ".join(dict.fromkeys(str(r.row["experiment"] or "runs") for r in runs))
        build(runs, args.out, title, argv)
    except ReportError as exc:
        print(f"egmla-table: error: {exc}", file=sys.stderr)
        return 2
    print(f"egmla-table: {len(runs)} runs -> {args.out}/table.md, results.csv, table.tex, *.png")
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
