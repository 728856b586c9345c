"""Loss curves for egmla-table: each run's training and validation loss, read from its Lightning CSV logs and drawn
against training tokens (loss_curves.png) and against training time (loss_vs_time.png), and each run's smoothed
training loss at an equal training time (the table's "train loss @ T").

Logs: <run_dir>/csv/version_N/metrics.csv, one version per process (a resume adds N+1). Versions are joined by step:
a later version replaces the earlier rows from its first step on (the steps redone after the checkpoint).

Tokens: Lightning writes the training row of the s-th optimizer step (1-based) at step s - 1, and a validation
inside fit at global_step - 1 too, so a row at step s stands for (s + 1) x tokens per step; the validation egmla-train
runs after fit (when the last step was not a validation step) is written at global_step, so tokens are capped at
train.tokens. Tokens per step: data.batch_size x data.seq_len x train.devices x trainer.accumulate_grad_batches,
else train.tokens / train.steps.

Time (training time, wall clock on the run's devices): cumulative over the logged perf/tok_per_s windows, each
window's tokens at its own rate, except the first window of each process (compilation, warm-up), taken at the run's
steady train.tok_per_s as results.json does; validation and checkpoint writes lie outside the windows, and steps
redone after a resume count once. A run without logged windows: tokens / train.tok_per_s.

Smoothing: a debiased exponential moving average over the logged points, SMOOTHING the weight of the past.
"""

from __future__ import annotations

import bisect
import csv
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import Run

SMOOTHING = 0.8
SMOOTHING_TEXT = f"EMA {SMOOTHING} over logged points"
TIME_SOURCE = "summed over the logged tok/s windows"
CURVES_PNG = "loss_curves.png"
TIME_PNG = "loss_vs_time.png"


class NoCurve(Exception):
    """Why a run has no curve (one line, shown in table.md)."""


@dataclass
class Curve:
    """One run's series: training points at each logged train/loss, validation points at each val/loss. seconds
    and val_seconds are None when no throughput is known (no logged windows, no train.tok_per_s)."""

    tokens_per_step: float
    steps: list[int]
    tokens: list[float]
    loss: list[float]
    smooth: list[float]
    seconds: list[float] | None
    val_steps: list[int]
    val_tokens: list[float]
    val_loss: list[float]
    val_seconds: list[float] | None
    time_source: str | None  # "windows" | "steady" | None


# ------------------------------------------------------------------------------------------------ reading logs


def metric_files(run_dir: Path) -> list[Path]:
    """csv/version_N/metrics.csv of the run, by N (version_10 after version_9)."""
    found = []
    for path in (run_dir / "csv").glob("version_*/metrics.csv"):
        if match := re.fullmatch(r"version_(\d+)", path.parent.name):
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


def _float(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_rows(path: Path) -> list[dict[str, float]]:
    """The numeric cells of each row that has a step."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            values = {key: _float(text) for key, text in raw.items() if key}
            row = {key: value for key, value in values.items() if value is not None}
            if "step" in row:
                rows.append(row)
    return rows


def joined_rows(run_dir: Path) -> list[dict[str, float]]:
    """Every version's rows by step, each tagged with its process (version order); a later version replaces the
    earlier rows from its first step on."""
    joined: list[dict[str, float]] = []
    for process, path in enumerate(metric_files(run_dir)):
        rows = read_rows(path)
        if not rows:
            continue
        first = min(row["step"] for row in rows)
        joined = [row for row in joined if row["step"] < first]
        joined += [row | {"process": process} for row in rows]
    return sorted(joined, key=lambda row: row["step"])  # stable: a step's train row stays before its validation


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def tokens_per_step(data: dict[str, Any]) -> float | None:
    """Training tokens per optimizer step: batch x context x devices x accumulation, else tokens / steps."""
    config, train = data.get("config") or {}, data.get("train") or {}
    factors = [
        (config.get("data") or {}).get("batch_size"),
        (config.get("data") or {}).get("seq_len"),
        train.get("devices"),
        (config.get("trainer") or {}).get("accumulate_grad_batches", 1),
    ]
    if all(map(_positive_int, factors)):
        return float(math.prod(factors))
    if _positive_int(train.get("steps")) and _positive_int(train.get("tokens")):
        return train["tokens"] / train["steps"]
    return None


def ema(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: the first value is kept, later ones lean on the past by `weight`."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**i))
    return smoothed


def time_knots(rows: Sequence[dict[str, float]], per_step: float, steady: float | None) -> list[tuple[float, float]]:
    """(tokens, seconds) at the end of each logged throughput window, from (0, 0): each window's tokens at its
    logged rate, the first window of each process at the steady rate."""
    knots = [(0.0, 0.0)]
    processes = set()
    for row in rows:
        rate = row.get("perf/tok_per_s")
        if not rate or rate <= 0:
            continue
        if row["process"] not in processes:  # this process's first window: compilation and warm-up
            processes.add(row["process"])
            rate = steady or rate
        tokens = (row["step"] + 1) * per_step
        if tokens > knots[-1][0]:
            knots.append((tokens, knots[-1][1] + (tokens - knots[-1][0]) / rate))
    return knots


def seconds_at(knots: list[tuple[float, float]], tokens: float, tail_rate: float) -> float:
    """Training seconds after `tokens`: interpolated between knots, past the last one at `tail_rate`."""
    xs = [t for t, _ in knots]
    if tokens >= xs[-1]:
        return knots[-1][1] + (tokens - xs[-1]) / tail_rate
    i = bisect.bisect_right(xs, tokens)
    (t0, s0), (t1, s1) = knots[i - 1], knots[i]
    return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)


def read_curve(run_dir: Path, data: dict[str, Any]) -> Curve:
    """The run's series from its metric logs; NoCurve says why there are none."""
    if not metric_files(run_dir):
        raise NoCurve("no csv/version_*/metrics.csv: trained with logger=wandb, or the logs were not copied")
    per_step = tokens_per_step(data)
    if per_step is None:
        raise NoCurve("tokens per step unknown (results.json lacks data.batch_size/seq_len and train.steps/tokens)")
    rows = joined_rows(run_dir)
    train = [row for row in rows if "train/loss" in row]
    val = [row for row in rows if "val/loss" in row]
    if not train:
        raise NoCurve("its metric logs have no train/loss rows")
    train_data = data.get("train") or {}
    cap = train_data.get("tokens") if _positive_int(train_data.get("tokens")) else math.inf

    def tokens(rows: list[dict[str, float]]) -> list[float]:
        return [min((row["step"] + 1) * per_step, cap) for row in rows]

    rate = train_data.get("tok_per_s")
    steady = float(rate) if isinstance(rate, int | float) and rate > 0 else None
    knots = time_knots(rows, per_step, steady)
    if len(knots) > 1:
        source = "windows"
        (t0, s0), (t1, s1) = knots[-2:]
        tail_rate = steady or (t1 - t0) / (s1 - s0)
    else:
        source, tail_rate = ("steady", steady) if steady else (None, None)
    curve = Curve(
        tokens_per_step=per_step,
        steps=[int(row["step"]) for row in train],
        tokens=tokens(train),
        loss=[row["train/loss"] for row in train],
        smooth=ema([row["train/loss"] for row in train]),
        seconds=None,
        val_steps=[int(row["step"]) for row in val],
        val_tokens=tokens(val),
        val_loss=[row["val/loss"] for row in val],
        val_seconds=None,
        time_source=source,
    )
    if source is not None:
        curve.seconds = [seconds_at(knots, t, tail_rate) for t in curve.tokens]
        curve.val_seconds = [seconds_at(knots, t, tail_rate) for t in curve.val_tokens]
    return curve


# ------------------------------------------------------------------------------------------------ equal time


def value_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """ys linearly interpolated at x; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:
        return ys[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])


def equal_time(runs: Sequence[Run], curves: dict[Path, Curve]) -> None:
    """Fill each row's equal_time_s, T: the shortest training time (end of the time curve) among the runs of its
    model size that have one, and train_loss_at_equal_time: its smoothed training loss at T."""
    by_size: dict[str, list[tuple[Run, Curve]]] = defaultdict(list)
    for run in runs:
        curve = curves.get(run.path)
        if curve is not None and curve.seconds:
            by_size[str(run.row["size"])].append((run, curve))
    for group in by_size.values():
        shortest = min(curve.seconds[-1] for _, curve in group)
        for run, curve in group:
            run.row["equal_time_s"] = shortest
            run.row["train_loss_at_equal_time"] = value_at(curve.seconds, curve.smooth, shortest)


# ------------------------------------------------------------------------------------------------------ plots


def labels(runs: Sequence[Run]) -> list[str]:
    """Each run's legend label: its attention (with the size when several), then, where runs share it, the first of
    seed, run name and run directory that tells them apart."""
    several_sizes = len({str(r.row["size"]) for r in runs}) > 1
    base = [f"{r.row['size']} {r.row['attention']}" if several_sizes else str(r.row["attention"]) for r in runs]
    result = []
    for label, run in zip(base, runs, strict=True):
        twins = [r for b, r in zip(base, runs, strict=True) if b == label]
        if len(twins) > 1:
            for form, key in (("seed {}", "seed"), ("({})", "run"), ("({})", "run_dir")):
                if len({str(r.row.get(key)) for r in twins}) == len(twins):
                    label = f"{label} {form.format(run.row.get(key))}"
                    break
        result.append(label)
    return result


def _scale(values: Sequence[float], units: Sequence[tuple[float, str]]) -> tuple[float, str]:
    top = max(values, default=0)
    return next(((scale, unit) for scale, unit in units if top >= 2 * scale), units[-1])


TOKEN_UNITS = ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands"), (1.0, "count"))
TIME_UNITS = ((3600.0, "h"), (60.0, "min"), (1.0, "s"))


def plot_curves(
    path: Path, title: str, series: Sequence[tuple[str, Curve]], time: bool, marks: Sequence[tuple[float, str]] = ()
) -> None:
    """Smoothed training loss as lines, validation loss as markers of the same colour, one colour per run (by its
    place in `series`, so both figures agree; against time, runs without a time axis are left out); left the whole
    run (y limited to what follows the first 5% of the axis), right its second half. `marks`: vertical lines
    (x, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xs(curve: Curve) -> tuple[list[float], list[float]]:
        return (curve.seconds or [], curve.val_seconds or []) if time else (curve.tokens, curve.val_tokens)

    drawn = [(i, label, curve) for i, (label, curve) in enumerate(series) if xs(curve)[0]]
    scale, unit = _scale([x for _, _, c in drawn for x in xs(c)[0]], TIME_UNITS if time else TOKEN_UNITS)
    end = max(xs(c)[0][-1] for _, _, c in drawn) / scale
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=150)
    for ax, start in zip(axes, (0.05, 0.5), strict=True):
        shown: list[float] = []
        for i, label, curve in drawn:
            colour, style = f"C{i % 10}", ("-", "--", ":")[i // 10 % 3]
            train_x, val_x = ([x / scale for x in v] for v in xs(curve))
            ax.plot(train_x, curve.smooth, color=colour, linestyle=style, linewidth=1.2, label=label)
            ax.scatter(val_x, curve.val_loss, color=colour, s=22, zorder=3, edgecolors="black", linewidths=0.4)
            shown += [y for x, y in zip(train_x, curve.smooth, strict=True) if x >= start * end]
            shown += [y for x, y in zip(val_x, curve.val_loss, strict=True) if x >= start * end]
        for x, label in marks:
            ax.axvline(x / scale, color="grey", linestyle=":", linewidth=1, label=label)
        if shown:
            low, high = min(shown), max(shown)
            pad = 0.05 * (high - low) or 0.01
            ax.set_ylim(low - pad, high + pad)
        ax.set_xlim(start * end if start >= 0.5 else 0, end * 1.01)
        ax.set_xlabel(f"training time ({unit}, wall clock; {TIME_SOURCE})" if time else f"training tokens ({unit})")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(True, alpha=0.3)
    axes[0].set_title("whole run", fontsize=9)
    axes[1].set_title("second half", fontsize=9)
    axes[1].scatter([], [], color="white", edgecolors="black", s=22, label="validation loss")
    axes[1].legend(fontsize=7, loc="upper right")
    against = "training time" if time else "training tokens"
    fig.suptitle(f"{title}: training loss ({SMOOTHING_TEXT}) and validation loss (markers) vs {against}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ entry point


def format_seconds(seconds: float) -> str:
    scale, unit = _scale([seconds], TIME_UNITS)
    return f"{seconds / scale:.3g} {unit}"


def add_curves(out: Path, title: str, runs: Sequence[Run]) -> list[str]:
    """Read every run's logs, fill the rows' equal-time columns, draw the two figures into `out`; the lines table.md
    shows about them."""
    curves: dict[Path, Curve] = {}
    skipped: dict[str, list[str]] = defaultdict(list)  # reason -> runs
    for run in runs:
        try:
            curves[run.path] = read_curve(run.path.parent, run.data)
        except (NoCurve, OSError, ValueError, csv.Error) as exc:
            skipped[str(exc)].append(str(run.row["run"]))
    equal_time(runs, curves)
    lines = ["", "## Loss curves", ""]
    named = [(label, curves[r.path]) for label, r in zip(labels(runs), runs, strict=True) if r.path in curves]
    if named:
        plot_curves(out / CURVES_PNG, title, named, time=False)
        lines += [f"![training and validation loss vs training tokens]({CURVES_PNG})", ""]
    if any(curve.seconds for _, curve in named):
        marks = sorted({(r.row["equal_time_s"], str(r.row["size"])) for r in runs if r.row.get("equal_time_s")})
        several = len(marks) > 1
        marks = [(t, f"T = {format_seconds(t)}" + (f" ({size})" if several else "")) for t, size in marks]
        plot_curves(out / TIME_PNG, title, named, time=True, marks=marks)
        lines += [f"![training and validation loss vs training time]({TIME_PNG})", ""]
    if named:
        lines.append(
            f"Training loss smoothed ({SMOOTHING_TEXT}); tokens = (logged step + 1) x tokens per step. Time: "
            "cumulative over the logged perf/tok_per_s windows, the first window of each process (compilation, "
            "warm-up) at the steady tok/s; validation and checkpoint writes left out."
        )
        steady = [str(r.row["run"]) for r in runs if r.path in curves and curves[r.path].time_source == "steady"]
        if steady:
            lines.append(f"No logged throughput windows, time = tokens / steady tok/s: {', '.join(steady)}.")
        untimed = [str(r.row["run"]) for r in runs if r.path in curves and curves[r.path].time_source is None]
        if untimed:
            lines.append(f"No throughput known, left out of {TIME_PNG}: {', '.join(untimed)}.")
    else:
        lines.append(f"No run has metric logs: {CURVES_PNG} and {TIME_PNG} are not drawn.")
    for reason, names in skipped.items():
        lines.append(f"Without curves ({reason}): {', '.join(names)}.")
    return lines
