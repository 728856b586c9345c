"""egmla-train's steady tok/s against egmla-bench train's, per variant, as Markdown: the loop figures from what the
runs wrote (results.json `train.tok_per_s`, or for a run without results.json its metric log: every
perf/tok_per_s window but the first, each of the same number of steps), the benchmark's from results.csv rows of
one commit.

    python experiments/throughput/loop_vs_bench.py --bench-commit c08f4c39b250 \\
        mha=experiments/throughput/loop_runs/mha egmla-kv64-g256=experiments/table1_small/runs/trial-010 ...
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def loop_tok_per_s(run: Path) -> tuple[float, str]:
    """Steady tok/s of a run folder and where it came from."""
    if (run / "results.json").is_file():
        return json.loads((run / "results.json").read_text())["train"]["tok_per_s"], "results.json"
    logs = sorted(run.glob("csv/version_*/metrics.csv")) or [run / "metrics.csv"]
    with open(logs[-1]) as f:
        windows = [float(r["perf/tok_per_s"]) for r in csv.DictReader(f) if r.get("perf/tok_per_s")]
    steady = windows[1:]  # equal-token windows: tokens / time is the harmonic mean of their rates
    return len(steady) / sum(1 / w for w in steady), f"metric log, {len(steady)} windows"


def commit_of(run: Path) -> str:
    environment = run / "environment.json"
    return json.loads(environment.read_text())["git"]["commit"][:7] if environment.is_file() else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-commit", required=True, help="results.csv rows of this commit (a prefix)")
    parser.add_argument("runs", nargs="+", help="VARIANT=RUN_DIR, VARIANT as results.csv names it")
    args = parser.parse_args()
    with open(HERE / "results.csv") as f:
        bench = {
            r["variant"]: float(r["tok_per_s"])
            for r in csv.DictReader(f)
            if r["commit"].startswith(args.bench_commit) and r["size"] == "120m" and r["gpus"] == "1"
        }
    print("| variant | loop run | loop commit | loop tok/s | from | benchmark tok/s | loop / benchmark |")
    print("|---|---|---|---:|---|---:|---:|")
    for spec in args.runs:
        variant, run = spec.split("=", 1)
        tok_per_s, source = loop_tok_per_s(Path(run))
        ratio = tok_per_s / bench[variant]
        print(
            f"| {variant} | {run} | {commit_of(Path(run))} | {tok_per_s:,.0f} | {source} | {bench[variant]:,.0f} "
            f"| {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
