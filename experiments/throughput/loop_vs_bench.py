"""egmla-train's steady tok/s against egmla-bench train's, per variant, as Markdown: the loop figures from what the
runs wrote (results.json `train.tok_per_s`, or for a run without results.json its metric log: every
perf/tok_per_s window but the first, each of the same number of steps), the benchmark's from results.csv rows at
the same settings (120M, seq 2048, batch 16, one GPU): those of one commit, or the newest of each variant.

    python experiments/throughput/loop_vs_bench.py --bench-commit c08f4c39b250 \\
        mha=experiments/throughput/loop_runs/mha egmla-kv64-g256=experiments/table1_small/runs/trial-010 ...
    make bench-loop        # measures both on this GPU, then prints this table
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from egmla.report import load_results
from egmla.report_curves import joined_rows

HERE = Path(__file__).resolve().parent


def loop_tok_per_s(run: Path) -> tuple[float, str]:
    """Steady tok/s of a run folder and where it came from."""
    if (run / "results.json").is_file():
        return load_results(run / "results.json")["train"]["tok_per_s"], "results.json"
    rows = [row for row in joined_rows(run) if "perf/tok_per_s" in row]
    # every window but each process's first (compilation, warm-up), as results.json counts them; equal-token
    # windows, so tokens / time is the harmonic mean of their rates
    steady = [
        row["perf/tok_per_s"]
        for before, row in zip([None, *rows], rows, strict=False)
        if before and before["process"] == row["process"]
    ]
    return len(steady) / sum(1 / w for w in steady), f"metric log, {len(steady)} windows"


def commit_of(run: Path) -> str:
    environment = run / "environment.json"
    return json.loads(environment.read_text())["git"]["commit"][:7] if environment.is_file() else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-commit", help="results.csv rows of this commit (default: each variant's newest row)")
    parser.add_argument("--csv", type=Path, default=HERE / "results.csv", help="the benchmark's results.csv")
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
    print("| variant | loop run | loop commit | loop tok/s | from | benchmark tok/s | loop / benchmark |")
    print("|---|---|---|---:|---|---:|---:|")
    for spec in args.runs:
        variant, run = spec.split("=", 1)
        tok_per_s, source = loop_tok_per_s(Path(run))
        if variant not in bench:
            raise SystemExit(f"loop_vs_bench: no benchmark row of {variant} at 120m, seq 2048, batch 16 in {args.csv}")
        ratio = tok_per_s / bench[variant]
        print(
            f"| {variant} | {run} | {commit_of(Path(run))} | {tok_per_s:,.0f} | {source} | {bench[variant]:,.0f} "
            f"| {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
