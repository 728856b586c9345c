"""How busy the GPU was in each stretch of work, from an nvidia-smi log: the samples above a power threshold, in
runs of consecutive seconds, with their utilisation (the share of each sample in which a kernel ran) and SM clock
(the times printed span the whole stretch; the figures leave out its first and last samples, partly idle).
A benchmark that keeps the GPU fed reads ~100%; a training loop whose host leaves gaps reads less, on the same
clocks. The log is what this command writes (one line a second; a header line is skipped):

    nvidia-smi --query-gpu=timestamp,temperature.gpu,clocks.sm,power.draw,utilization.gpu --format=csv,noheader \\
        -lms 1000 > gpu.csv
    python experiments/throughput/gpu_busy.py experiments/throughput/gpu_clocks_3baafec.csv
"""

from __future__ import annotations

import argparse
import csv


def number(field: str) -> float:
    return float(field.strip().split()[0])


def stretches(rows: list[list[str]], watts: float) -> list[list[tuple[str, float, float]]]:
    """Runs of consecutive samples above `watts`: (time, SM clock MHz, utilisation %) each."""
    runs, current = [], []
    for row in rows:
        try:
            sample = (row[0].strip()[11:19], number(row[2]), number(row[4]), number(row[3]))
        except (IndexError, ValueError):  # the header, or a line cut short when nvidia-smi was stopped
            continue
        if sample[3] > watts:
            current.append(sample[:3])
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="nvidia-smi CSV: timestamp, temperature, clocks.sm, power.draw, utilization.gpu")
    parser.add_argument("--watts", type=float, default=400.0, help="power above which the card counts as working")
    parser.add_argument("--min-samples", type=int, default=3, help="shorter stretches are left out")
    args = parser.parse_args()
    if args.min_samples < 3:
        parser.error("--min-samples must be at least 3: a stretch's first and last samples are left out")
    with open(args.log) as f:
        rows = list(csv.reader(f))
    for run in stretches(rows, args.watts):
        if len(run) < args.min_samples:
            continue
        body = run[1:-1]  # the first and last samples hold part idle time
        clocks, busy = [sample[1] for sample in body], [sample[2] for sample in body]
        print(
            f"{run[0][0]}-{run[-1][0]} {len(body):4d} samples  utilisation {min(busy):.0f}-{max(busy):.0f}% "
            f"(mean {sum(busy) / len(busy):.1f})  SM clock mean {sum(clocks) / len(clocks):.0f} MHz"
        )


if __name__ == "__main__":
    main()
