"""Scaling figures for egmla-table, drawn when the runs span two model sizes or more: validation loss against
parameters (loss_vs_params.png) and against training compute (loss_vs_flops.png), one line per attention variant
through its sizes, each point labelled with its KV bytes per token; and a section of table.md with each variant's
loss per size and, for two variants, their difference at each size (does the margin grow, hold or shrink?).

Parameters: non-embedding parameters (the transformer blocks), the usual x-axis of scaling laws; EG-MLA's gate
tables are token-id lookups and count no more than the token embedding does. Training compute: results.json's
flops_per_token (forward and backward, attention included) x train.tokens. Runs of one variant and size (seeds)
are averaged into one point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Run

PARAMS_PNG = "loss_vs_params.png"
FLOPS_PNG = "loss_vs_flops.png"


@dataclass(frozen=True)
class Point:
    """One variant at one size: the mean over its runs (seeds)."""

    variant: str
    size: str
    params: float
    flops: float | None
    val_loss: float
    kv_bytes: int | None
    runs: int


def training_flops(run: Run) -> float | None:
    per_token, tokens = run.data.get("flops_per_token"), run.row["train_tokens"]
    return float(per_token) * float(tokens) if per_token and tokens else None


def scaling_points(runs: Sequence[Run]) -> list[Point]:
    """One point per (variant, size) with a validation loss and a parameter count, in the runs' order (sizes
    ascending, as egmla-table sorts them). Empty unless they span two sizes or more."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.row["val_loss"] is not None and run.row["params_non_embedding"]:
            groups.setdefault((str(run.row["attention"]), str(run.row["size"])), []).append(run)
    if len({size for _, size in groups}) < 2:
        return []
    points = []
    for (variant, size), members in groups.items():
        flops = [training_flops(r) for r in members]
        points.append(
            Point(
                variant=variant,
                size=size,
                params=mean(float(r.row["params_non_embedding"]) for r in members),
                flops=None if None in flops else mean(f for f in flops if f is not None),
                val_loss=mean(float(r.row["val_loss"]) for r in members),
                kv_bytes=members[0].row["kv_bytes_per_token"],
                runs=len(members),
            )
        )
    return points


def margin_lines(points: Sequence[Point], figures: Sequence[str]) -> list[str]:
    """table.md's section: validation loss per size (rows) and variant (columns, the largest KV cache first, so
    the baseline leads); with two variants, the second minus the first at each size (negative: the second is
    better); then the links to `figures`, the ones drawn."""
    first_kv = {p.variant: p.kv_bytes or 0 for p in reversed(points)}
    variants = sorted(dict.fromkeys(p.variant for p in points), key=lambda v: -first_kv[v])
    sizes = list(dict.fromkeys(p.size for p in points))
    at = {(p.variant, p.size): p for p in points}
    two = len(variants) == 2
    header = ["size", "non-emb params", *variants] + ([f"{variants[1]} - {variants[0]}"] if two else [])
    lines = ["", "## Scaling", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for size in sizes:
        here = [at.get((v, size)) for v in variants]
        params = next(p.params for p in here if p is not None)
        cells = [size, f"{params / 1e6:,.1f}M", *(f"{p.val_loss:.4f}" if p else "—" for p in here)]
        if two:
            cells.append(f"{here[1].val_loss - here[0].val_loss:+.4f}" if here[0] and here[1] else "—")
        lines.append("| " + " | ".join(cells) + " |")
    averaged = [p for p in points if p.runs > 1]
    lines += [
        "",
        "Validation loss (nats/token); non-embedding parameters of the first variant listed at each size."
        + (f" {len(averaged)} point(s) average several runs (seeds)." if averaged else ""),
        "",
        *figures,
    ]
    return lines


def plot_scaling(path: Path, points: Sequence[Point], x: str, xlabel: str, title: str) -> None:
    """Loss vs `x` (a Point field; log scale), one line per variant through its sizes, points labelled with
    size and KV bytes per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=150)
    for i, variant in enumerate(dict.fromkeys(p.variant for p in points)):
        mine = sorted((p for p in points if p.variant == variant), key=lambda p: getattr(p, x))
        xs, ys = [getattr(p, x) for p in mine], [p.val_loss for p in mine]
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=variant)
        for p in mine:
            kv = "KV ?" if p.kv_bytes is None else f"{p.kv_bytes:,} B/token"
            ax.annotate(
                f"{p.size}, {kv}", (getattr(p, x), p.val_loss), textcoords="offset points", xytext=(5, 4), fontsize=7
            )
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_scaling(out: Path, title: str, runs: Sequence[Run]) -> list[str]:
    """Draw the scaling figures into `out` when the runs span two sizes or more; table.md's lines about them."""
    points = scaling_points(runs)
    if not points:
        return []
    plot_scaling(
        out / PARAMS_PNG,
        points,
        "params",
        "non-embedding parameters (log scale)",
        f"{title}: validation loss vs parameters",
    )
    figures = [f"![validation loss vs parameters]({PARAMS_PNG})"]
    if all(p.flops and math.isfinite(p.flops) for p in points):
        plot_scaling(
            out / FLOPS_PNG,
            points,
            "flops",
            "training FLOPs (flops_per_token x tokens; log scale)",
            f"{title}: validation loss vs training compute",
        )
        figures.append(f"![validation loss vs training FLOPs]({FLOPS_PNG})")
    return margin_lines(points, figures)
