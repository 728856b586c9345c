"""egmla-train's steady tok/s against egmla-bench train's, per variant, as Markdown: the loop figures from what the
runs wrote (results.json `train.tok_per_s`, or for a run without results.json its metric log: every
perf/tok_per_s window but the first, each of the same number of steps), the benchmark's from results.csv rows at
the same settings (120M, seq 2048, batch 16, one GPU): those of one commit, or the newest of each variant.

    python experiments/throughput/loop_vs_bench.py --bench-commit c08f4c39b250 \\
        mha=experiments/throughput/loop_runs/c08f4c3/mha egmla-kv64-g256=experiments/table1_small/runs/trial-010 ...
    make bench-loop        # measures both on this GPU, then prints this table

--windows adds a second table: the ratio in each steady window of the metric log, to tell a loop that is slower
at every step from one that slows down as it runs (a card heating up under its power limit, a data stall); and,
for runs that logged them, each window's shares of time between batches and in Python's garbage collector.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from egmla.report import load_results
from egmla.report_curves import joined_rows

HERE = Path(__file__).resolve().parent


def steady_rows(run: Path) -> list[dict[str, float]]:
    """The metric-log rows of every logged throughput window but each process's first (compilation, warm-up), as
    results.json counts them."""
    rows = [row for row in joined_rows(run) if "perf/tok_per_s" in row]
    pairs = zip([None, *rows], rows, strict=False)
    return [row for before, row in pairs if before and before["process"] == row["process"]]


def loop_tok_per_s(run: Path) -> tuple[float, str]:
    """Steady tok/s of a run folder and where it came from."""
    if (run / "results.json").is_file():
        return load_results(run / "results.json")["train"]["tok_per_s"], "results.json"
    steady = [row["perf/tok_per_s"] for row in steady_rows(run)]
    # equal-token windows, so tokens / time is the harmonic mean of their rates
    return len(steady) / sum(1 / w for w in steady), f"metric log, {len(steady)} windows"


def commit_of(run: Path) -> str:
    environment = run / "environment.json"
    return json.loads(environment.read_text())["git"]["commit"][:7] if environment.is_file() else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-commit", help="results.csv rows of this commit (default: each variant's newest row)")
    parser.add_argument("--csv", type=Path, default=HERE / "results.csv", help="the benchmark's results.csv")
    parser.add_argument("--windows", action="store_true", help="also the ratio in each steady window of each run")
    parser.add_argument("runs", nargs="+", help="VARIANT=RUN_DIR, VARIANT as results.csv names it")
    args = parser.parse_args()
    with open(args.csv) as f:
        rows = [
            r for r in csv.DictReader(f) if (r["size"], r["seq"], r["batch"], r["gpus"]) == ("120m", "2048", "16", "1")
        ]
    if args.bench_commit:
        rows = [
            r for r in rows if r["commit"].startswith(args.bench_commit) or args.bench_commit.startswith(r["commit"])
        ]
    bench = {r["variant"]: float(r["tok_per_s"]) for r in rows}  # later rows win: the newest of each variant
    runs = [spec.split("=", 1) for spec in args.runs]
    for variant, _ in runs:
        if variant not in bench:
            raise SystemExit(f"loop_vs_bench: no benchmark row of {variant} at 120m, seq 2048, batch 16 in {args.csv}")
    print("| variant | loop run | loop commit | loop tok/s | from | benchmark tok/s | loop / benchmark |")
    print("|---|---|---|---:|---|---:|---:|")
    for variant, run in runs:
        tok_per_s, source = loop_tok_per_s(Path(run))
        ratio = tok_per_s / bench[variant]
        print(
            f"| {variant} | {run} | {commit_of(Path(run))} | {tok_per_s:,.0f} | {source} | {bench[variant]:,.0f} "
            f"| {ratio:.3f} |"
        )
    if args.windows:
        print_windows(runs, bench)


SHARES = {
    "perf/between_batches": "Share of each window between batches (perf/between_batches)",
    "perf/garbage_collection": "Share of each window in Python's garbage collector (perf/garbage_collection)",
}


def print_windows(runs: list[list[str]], bench: dict[str, float]) -> None:
    """Loop / benchmark in each steady window, one row per run, one column per window's last step; then, for runs
    that logged them, the shares of each window between batches and in the garbage collector (egmla/train/perf.py)."""
    steady = {run: steady_rows(Path(run)) for _, run in runs}  # each metric log read once
    steps = sorted({int(row["step"]) for rows in steady.values() for row in rows})
    header = "| variant | loop run | " + " | ".join(map(str, steps)) + " |\n|---|---|" + "---:|" * len(steps)
    ratios = {"perf/tok_per_s": "Loop / benchmark in each steady window (columns: the window's last step)"}
    for metric, title in (ratios | SHARES).items():
        values = {run: {int(row["step"]): row[metric] for row in rows if metric in row} for run, rows in steady.items()}
        ratio = metric == "perf/tok_per_s"  # every run's row; the shares only where logged
        if not ratio and not any(values.values()):
            continue
        print(f"\n{title}\n")
        print(header)
        for variant, run in runs:
            if ratio or values[run]:
                scale = bench[variant] if ratio else 1.0
                cells = [f"{values[run][s] / scale:.3f}" if s in values[run] else "" for s in steps]
                print(f"| {variant} | {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
